"""32-release-codename: answer.txt gives Juniper: README.md -> RELEASE (v3.2) -> releases/v3.2.json codename"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "Juniper")
