"""11-hottest-city: answer.txt gives Dakar, the city of the highest temp_c in temps.csv"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 'Dakar')
