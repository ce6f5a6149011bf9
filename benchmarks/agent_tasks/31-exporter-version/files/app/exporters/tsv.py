"""Tab-separated export."""

FORMAT_VERSION = 7
DELIMITER = "\t"
