#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
cut -d' ' -f1 access.log | sort -u | wc -l > answer.txt
