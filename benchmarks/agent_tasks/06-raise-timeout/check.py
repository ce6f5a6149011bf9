"""06-raise-timeout: client/settings.py: DEFAULT_TIMEOUT 30 and MAX_RETRIES 5, every other line unchanged"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, run_python

workdir, _ = args()
proc = run_python(workdir, ["-c", "import client.settings as s; print(s.DEFAULT_TIMEOUT, s.MAX_RETRIES, s.CONNECT_TIMEOUT, s.BACKOFF_FACTOR, s.BASE_URL, s.USER_AGENT)"])
if proc.returncode != 0:
    fail(f"client/settings.py does not import: {proc.stderr.strip()[-300:]}")
values = proc.stdout.split()
if values[:2] != ["30", "5"]:
    fail(f"DEFAULT_TIMEOUT, MAX_RETRIES are {values[:2]}, expected 30 and 5")
if values[2:] != ["5", "0.5", "https://api.example.org/v2", "example-client/1.0"]:
    fail(f"other settings changed: {values[2:]}")
ok()
