"""04-toml-settings: settings.toml parses, app.debug is false and app.log_level is 'warning', the rest unchanged"""

import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, fail, ok, pristine, read

workdir, _ = args()
try:
    got = tomllib.loads(read(workdir, "settings.toml"))
except tomllib.TOMLDecodeError as e:
    fail(f"settings.toml does not parse: {e}")
want = tomllib.loads((pristine(__file__) / "settings.toml").read_text())
want["app"].update(debug=False, log_level="warning")
if got.get("app", {}).get("debug") is not False:
    fail(f"app.debug is {got.get('app', {}).get('debug')!r}, expected false")
if got.get("app", {}).get("log_level") != "warning":
    fail(f"app.log_level is {got.get('app', {}).get('log_level')!r}, expected 'warning'")
if got != want:
    fail("settings.toml changed more than app.debug and app.log_level (storage.debug must stay true)")
ok()
