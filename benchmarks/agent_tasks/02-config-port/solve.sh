#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i 's/"port": 8080/"port": 9090/' config/app.json
