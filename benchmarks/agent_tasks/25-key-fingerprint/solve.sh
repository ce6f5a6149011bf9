#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
key=$(awk '/^\[production\]/ { p = 1 } p && /^key_file/ { print $3; exit }' deploy/targets.ini)
awk '{ print $2 }' "$key" > answer.txt
