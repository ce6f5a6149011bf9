"""Arithmetic helpers."""


def safe_div(a, b, default=None):
    """a / b, or `default` when b is zero."""
    return a / b


def clamp(x, low, high):
    """x limited to the range [low, high]."""
    return max(low, min(x, high))
