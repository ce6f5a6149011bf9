"""01-rename-function: no calc_total left in any .py file, compute_total defined, report.py prints the same totals"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, read, run_python

workdir, _ = args()
left = [str(p.relative_to(workdir)) for p in workdir.rglob("*.py") if "calc_total" in p.read_text(errors="replace")]
if left:
    fail(f"calc_total is still used in {', '.join(sorted(left))}")
if "def compute_total(" not in read(workdir, "shop/pricing.py"):
    fail("shop/pricing.py does not define compute_total")
proc = run_python(workdir, ["report.py"])
if proc.returncode != 0:
    fail(f"python report.py fails: {proc.stderr.strip()[-300:]}")
if proc.stdout.split() != ["cart:", "13.8", "bulk:", "66.0"]:
    fail(f"python report.py prints {proc.stdout!r}, expected 'cart: 13.8' and 'bulk: 66.0'")
ok()
