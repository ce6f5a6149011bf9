"""07-remove-user: users.txt lost the mallory line and nothing else, order kept"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
lines = [ln.strip() for ln in read(workdir, "users.txt").splitlines() if ln.strip()]
want = [ln for ln in (pristine(__file__) / "users.txt").read_text().splitlines() if ln and not ln.startswith("mallory:")]
if any(ln.startswith("mallory") for ln in lines):
    fail("mallory is still in users.txt")
if lines != want:
    fail("other lines of users.txt changed, went missing or moved")
ok()
