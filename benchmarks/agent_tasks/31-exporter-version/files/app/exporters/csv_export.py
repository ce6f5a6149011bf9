"""Old CSV export, no longer routed."""

FORMAT_VERSION = 5
DELIMITER = ","
