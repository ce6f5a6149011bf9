"""28-find-token: answer.txt gives tok_5d81e0b2, the API_TOKEN value set in one file under data/"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "tok_5d81e0b2")
