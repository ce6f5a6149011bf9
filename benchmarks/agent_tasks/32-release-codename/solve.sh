#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
r=$(tr -d '[:space:]' < RELEASE)
python -c "import json, sys; print(json.load(open(sys.argv[1]))['codename'])" "releases/$r.json" > answer.txt
