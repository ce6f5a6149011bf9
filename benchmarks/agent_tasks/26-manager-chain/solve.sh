#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
m=$(awk -F, '$2 == "Dana Whitfield" { print $4 }' employees.csv)
mm=$(awk -F, -v id="$m" '$1 == id { print $4 }' employees.csv)
awk -F, -v id="$mm" '$1 == id { print $2 }' employees.csv > answer.txt
