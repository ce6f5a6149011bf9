"""Durations written as '1h30m'."""

import re


def parse_duration(text):
    """'1h30m' -> 90, '45m' -> 45, '2h' -> 120: the duration in whole minutes."""
    total = 0
    for value, unit in re.findall(r"(\d+)([hm])", text):
        if unit == "h":
            total += int(value) * 24
        else:
            total += int(value)
    return total
