"""Small list helpers."""


def last_n(items, n):
    """The last n items of a list (all of them when n >= len(items)); [] when n <= 0."""
    if n <= 0:
        return []
    return items[-n:]


def chunks(items, size):
    """Split a list into lists of `size` items (the last one may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
