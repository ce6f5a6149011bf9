#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i 's/recie/recei/g; s/Recie/Recei/g' docs/*.md
