"""A tiny HTTP helper (not used by the tests)."""

from client.settings import DEFAULT_TIMEOUT, MAX_RETRIES


def describe():
    return f"timeout={DEFAULT_TIMEOUT}s retries={MAX_RETRIES}"
