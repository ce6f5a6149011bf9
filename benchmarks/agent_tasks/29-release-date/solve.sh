#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
v=$(grep '^fastwidget==' requirements.txt | cut -d= -f3)
grep "^## $v " vendor/fastwidget/CHANGELOG.md | sed 's/.*(\(.*\)).*/\1/' > answer.txt
