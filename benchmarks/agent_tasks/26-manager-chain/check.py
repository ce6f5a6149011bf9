"""26-manager-chain: answer.txt gives Liam Chen, the manager of Dana Whitfield's manager in employees.csv"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "Liam Chen")
