#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
tail -n +2 temps.csv | sort -t, -k3 -g -r | head -1 | cut -d, -f1 > answer.txt
