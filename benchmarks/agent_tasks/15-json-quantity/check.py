"""15-json-quantity: answer.txt gives 89, the total qty over the items of shipped orders in orders.json"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 89)
