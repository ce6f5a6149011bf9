"""People records."""


def by_age(people):
    """People (dicts with 'name' and 'age') from youngest to oldest; equal ages keep their order."""
    return sorted(people, key=lambda p: p["age"], reverse=True)


def names(people):
    """The names, in order."""
    return [p["name"] for p in people]
