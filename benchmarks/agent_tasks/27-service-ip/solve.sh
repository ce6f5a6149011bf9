#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
host=$(python -c "import json; print(json.load(open('services.json'))['billing']['host'])")
awk -F, -v h="$host" '$1 == h { print $2 }' hosts.csv > answer.txt
