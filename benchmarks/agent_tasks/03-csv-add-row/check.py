"""03-csv-add-row: inventory.csv keeps its header and rows in order and gains exactly one row B205,pear,0.75,40"""

import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
rows = list(csv.reader(io.StringIO(read(workdir, "inventory.csv"))))
rows = [r for r in rows if r]
want = [r for r in csv.reader(io.StringIO((pristine(__file__) / "inventory.csv").read_text())) if r]
if rows[: len(want)] != want:
    fail("the header or the existing rows changed")
new = rows[len(want):]
if len(new) != 1:
    fail(f"expected exactly one new row, found {len(new)}")
row = [c.strip() for c in new[0]]
if len(row) != 4 or row[:2] != ["B205", "pear"]:
    fail(f"new row {new[0]} is not sku B205, name pear")
try:
    price, qty = float(row[2]), int(row[3])
except ValueError:
    fail(f"new row {new[0]}: price or quantity is not a number")
if abs(price - 0.75) > 1e-9 or qty != 40:
    fail(f"new row {new[0]}: expected price 0.75 and quantity 40")
ok()
