"""Text helpers."""

import re


def slugify(title):
    """'Hello, World!' -> 'hello-world': the lowercase words (letters and digits) joined by '-'."""
    words = re.findall(r"[A-Za-z0-9]+", title)
    return "-".join(words).lower()


def initials(name):
    """'Ada Lovelace' -> 'AL'."""
    return "".join(part[0].upper() for part in name.split())
