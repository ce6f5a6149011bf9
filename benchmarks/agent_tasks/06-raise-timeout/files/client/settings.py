"""Settings of the HTTP client."""

BASE_URL = "https://api.example.org/v2"
DEFAULT_TIMEOUT = 10  # seconds
CONNECT_TIMEOUT = 5  # seconds
MAX_RETRIES = 3
BACKOFF_FACTOR = 0.5
USER_AGENT = "example-client/1.0"
