#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i '0,/^debug = true/s//debug = false/; s/^log_level = "debug"/log_level = "warning"/' settings.toml
