"""25-key-fingerprint: answer.txt gives 7f3a9c21, found via START_HERE.txt -> deploy/targets.ini -> keys/prod-7.key"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "7f3a9c21")
