"""02-config-port: config/app.json still valid JSON, server.port is 9090, every other value and config/dev.json unchanged"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
base = pristine(__file__)
try:
    app = json.loads(read(workdir, "config/app.json"))
except json.JSONDecodeError as e:
    fail(f"config/app.json is not valid JSON: {e}")
want = json.loads((base / "config/app.json").read_text())
want["server"]["port"] = 9090
if app.get("server", {}).get("port") != 9090:
    fail(f"server.port is {app.get('server', {}).get('port')!r}, expected 9090 (a number)")
if app != want:
    fail("config/app.json changed more than the port")
if json.loads(read(workdir, "config/dev.json")) != json.loads((base / "config/dev.json").read_text()):
    fail("config/dev.json was changed")
ok()
