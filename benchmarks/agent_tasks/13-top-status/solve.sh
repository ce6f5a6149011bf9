#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
awk '$3 != 200 { print $3 }' requests.log | sort | uniq -c | sort -rn | head -1 | awk '{ print $2 }' > answer.txt
