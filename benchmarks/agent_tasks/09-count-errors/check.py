"""09-count-errors: answer.txt gives 15, the number of ERROR lines in logs/app.log"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 15)
