"""Helpers shared by the tasks' ``check.py`` scripts.

Every checker is run as ``python check.py WORKDIR [ANSWER_FILE]``: WORKDIR is the
directory the agent worked in, ANSWER_FILE (optional) holds the agent's final answer
text. A checker exits 0 when the task is solved; otherwise it prints why and exits 1.

Value answers are read from ``WORKDIR/answer.txt`` and, failing that, from the final
answer text. Either passes when it is the value (case, surrounding quotes, backticks
and a final period ignored) or, when it is a short sentence (at most 300 characters),
when it holds the value as a whole word or number: "The total is 1,234.50." passes
for 1234.5.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

MAX_SENTENCE = 300


def fail(reason: str) -> NoReturn:
    print(f"FAIL: {reason}")
    sys.exit(1)


def ok(what: str = "solved") -> NoReturn:
    print(f"OK: {what}")
    sys.exit(0)


def args() -> tuple[Path, str]:
    """(workdir, final answer text) from ``sys.argv``; a missing answer file is an empty answer."""
    if len(sys.argv) < 2:
        print("usage: python check.py WORKDIR [ANSWER_FILE]", file=sys.stderr)
        sys.exit(2)
    workdir = Path(sys.argv[1]).resolve()
    if not workdir.is_dir():
        fail(f"workdir {workdir} does not exist")
    answer = ""
    if len(sys.argv) > 2 and Path(sys.argv[2]).is_file():
        answer = Path(sys.argv[2]).read_text(encoding="utf-8", errors="replace")
    return workdir, answer


def pristine(check_file: str) -> Path:
    """The untouched ``files/`` folder of the task whose ``check.py`` is ``check_file``."""
    return Path(check_file).resolve().parent / "files"


def read(workdir: Path, rel: str) -> str:
    """The text of ``workdir/rel``; a missing file fails the check."""
    path = workdir / rel
    if not path.is_file():
        fail(f"{rel} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def _clean(text: str) -> str:
    text = text.strip().strip("`").strip().strip("\"'").strip()
    return text[:-1].strip() if text.endswith(".") else text


def _numbers(text: str) -> list[float]:
    return [float(tok.replace(",", "")) for tok in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def matches(text: str, expected: str | float, *, tol: float = 1e-6) -> bool:
    """Whether ``text`` gives ``expected`` (a number when ``expected`` is an int or float)."""
    text = text.strip()
    if not text:
        return False
    if isinstance(expected, int | float):
        cleaned = _clean(text).replace(",", "").lstrip("$")
        try:
            return abs(float(cleaned) - expected) <= tol
        except ValueError:
            pass
        return len(text) <= MAX_SENTENCE and any(abs(x - expected) <= tol for x in _numbers(text))
    if _clean(text).lower() == expected.lower():
        return True
    pattern = r"(?<![\w-])" + re.escape(expected.lower()) + r"(?![\w-])"
    return len(text) <= MAX_SENTENCE and re.search(pattern, text.lower()) is not None


def check_answer(workdir: Path, answer: str, expected: str | float, *, tol: float = 1e-6) -> NoReturn:
    """Pass when ``answer.txt`` or the final answer text gives ``expected``; exit either way."""
    path = workdir / "answer.txt"
    written = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if written is not None and matches(written, expected, tol=tol):
        ok("answer.txt is right")
    if matches(answer, expected, tol=tol):
        ok("the final answer is right")
    got = "no answer.txt" if written is None else f"answer.txt holds {written.strip()[:80]!r}"
    fail(f"{got}; final answer {answer.strip()[:80]!r}; expected {expected!r}")


def run_tests(workdir: Path, check_file: str, tests: list[str], hidden: str, *, timeout: float = 60) -> NoReturn:
    """Run the task's own ``tests`` (as shipped, whatever the agent did to them) and the
    ``hidden`` test module's source against the agent's code; exit 0 when all pass."""
    with tempfile.TemporaryDirectory(prefix="agent-check-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(workdir, root, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        for rel in tests:
            shutil.copy2(pristine(check_file) / rel, root / rel)
        (root / "test_zz_hidden.py").write_text(hidden, encoding="utf-8")
        cmd = [sys.executable, "-m", "unittest", "discover", "-s", ".", "-p", "test_*.py"]
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            fail(f"the tests ran past {timeout:.0f} s")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        keep = [ln for ln in lines if ln.startswith(("FAIL:", "ERROR:")) or "Error" in ln] + lines[-1:]
        fail("tests fail (the shipped tests and a hidden test):\n" + "\n".join(keep[-12:]))
    ok("shipped and hidden tests pass")


def run_python(workdir: Path, args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in ``workdir`` with the checker's interpreter."""
    try:
        return subprocess.run([sys.executable, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"python {' '.join(args)} ran past {timeout:.0f} s")
