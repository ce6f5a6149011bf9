"""PDF report."""

FORMAT_VERSION = 12
