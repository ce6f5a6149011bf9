"""31-exporter-version: answer.txt gives 7: the 'export' route in app/routes.py -> app/exporters/tsv.py -> FORMAT_VERSION"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, check_answer

workdir, answer = args()
check_answer(workdir, answer, 7)
