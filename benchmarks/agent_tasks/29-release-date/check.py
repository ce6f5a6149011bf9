"""29-release-date: answer.txt gives 2023-11-08, the release date of the fastwidget version pinned in requirements.txt"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, "2023-11-08")
