#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
mod=$(grep '"export"' app/routes.py | cut -d'"' -f4)
grep '^FORMAT_VERSION' "$(echo "$mod" | tr . /).py" | awk '{ print $3 }' > answer.txt
