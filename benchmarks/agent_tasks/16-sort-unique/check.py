"""16-sort-unique: sorted_names.txt holds the distinct names of names.txt, sorted, one per line"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
got = [ln.strip() for ln in read(workdir, "sorted_names.txt").splitlines() if ln.strip()]
want = sorted({ln.strip() for ln in (pristine(__file__) / "names.txt").read_text().splitlines() if ln.strip()})
if got != want:
    fail(f"sorted_names.txt has {len(got)} lines {got[:5]}..., expected {len(want)}: {want[:5]}...")
ok()
