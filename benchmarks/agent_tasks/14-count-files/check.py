"""14-count-files: answer.txt gives 5, the number of files in notes/ mentioning 'deadline' in any case"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 5)
