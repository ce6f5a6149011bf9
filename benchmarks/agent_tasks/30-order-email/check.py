"""30-order-email: answer.txt gives ben.ode@example.com, order 1042 -> its customer in orders.csv -> the email in customers.csv"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 'ben.ode@example.com')
