"""05-fix-typo: no 'reciev' left under docs/, the text otherwise unchanged word for word"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
base = pristine(__file__)
for rel in ["docs/guide.md", "docs/faq.md"]:
    text = read(workdir, rel)
    if "reciev" in text.lower():
        fail(f"{rel} still says 'reciev...'")
    want = (base / rel).read_text().replace("recie", "recei").replace("Recie", "Recei")
    if text.split() != want.split():
        fail(f"{rel} changed more than the misspelling")
ok()
