#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sort -u names.txt > sorted_names.txt
