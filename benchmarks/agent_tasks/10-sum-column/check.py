"""10-sum-column: answer.txt gives 13859.42, the sum of the amount column of sales.csv"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 13859.42, tol=0.006)
