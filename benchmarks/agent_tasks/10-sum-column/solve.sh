#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
awk -F, 'NR > 1 { s += $3 } END { printf "%.2f\n", s }' sales.csv > answer.txt
