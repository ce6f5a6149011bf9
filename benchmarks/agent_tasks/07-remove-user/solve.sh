#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i '/^mallory:/d' users.txt
