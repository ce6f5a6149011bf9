"""mylib: a small library."""

__version__ = "1.3.2"
