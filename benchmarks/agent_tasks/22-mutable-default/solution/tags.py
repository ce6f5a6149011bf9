"""Tag lists."""


def add_tag(tag, tags=None):
    """The list `tags` (a new empty list when not given) with `tag` appended."""
    if tags is None:
        tags = []
    tags.append(tag)
    return tags
