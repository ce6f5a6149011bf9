"""12-distinct-ips: answer.txt gives 17, the number of distinct client IPs in access.log"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 17)
