"""JSON backup."""

FORMAT_VERSION = 3
