"""27-service-ip: answer.txt gives 10.2.3.71: billing -> h-17 in services.json -> its IP in hosts.csv"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "10.2.3.71")
