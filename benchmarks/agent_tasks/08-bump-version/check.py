"""08-bump-version: version 1.4.0 in setup.cfg and mylib/__init__.py, '## 1.4.0' heading above '## 1.3.2' in CHANGELOG.md"""

import configparser
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, read, run_python

workdir, _ = args()
cfg = configparser.ConfigParser()
try:
    cfg.read_string(read(workdir, "setup.cfg"))
    version = cfg["metadata"]["version"].strip()
except (configparser.Error, KeyError) as e:
    fail(f"setup.cfg: {e}")
if version != "1.4.0":
    fail(f"setup.cfg has version {version!r}")
proc = run_python(workdir, ["-c", "import mylib; print(mylib.__version__)"])
if proc.stdout.strip() != "1.4.0":
    fail(f"mylib.__version__ is {proc.stdout.strip()!r} {proc.stderr.strip()[-200:]}")
heads = [ln.strip() for ln in read(workdir, "CHANGELOG.md").splitlines() if ln.startswith("## ")]
if "## 1.4.0" not in heads or "## 1.3.2" not in heads or heads.index("## 1.4.0") > heads.index("## 1.3.2"):
    fail(f"CHANGELOG.md headings are {heads}, expected '## 1.4.0' above '## 1.3.2'")
ok()
