#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
grep -rh '^API_TOKEN=' data | cut -d= -f2 > answer.txt
