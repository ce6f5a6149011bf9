#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i 's/^DEFAULT_TIMEOUT = 10/DEFAULT_TIMEOUT = 30/; s/^MAX_RETRIES = 3/MAX_RETRIES = 5/' client/settings.py
