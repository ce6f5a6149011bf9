#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
grep -ril deadline notes | wc -l > answer.txt
