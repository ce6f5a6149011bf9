#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
grep -c ' ERROR ' logs/app.log > answer.txt
