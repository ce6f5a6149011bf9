"""CSV import."""

FORMAT_VERSION = 2
