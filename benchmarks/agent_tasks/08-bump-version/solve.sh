#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i 's/^version = 1.3.2/version = 1.4.0/' setup.cfg
sed -i 's/__version__ = "1.3.2"/__version__ = "1.4.0"/' mylib/__init__.py
sed -i 's/^## 1.3.2/## 1.4.0\n\n## 1.3.2/' CHANGELOG.md
