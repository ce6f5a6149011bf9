"""13-top-status: answer.txt gives 500, the most frequent non-200 status in requests.log"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 500)
