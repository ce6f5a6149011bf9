"""The durable run log: every event of every run, appended to SQLite (WAL) and on disk before the next action.

One database per runs folder (``runs.db``): a row per run in ``runs`` and its
events in ``events`` (run, seq, kind, JSON data, time). Each append is its own
transaction with ``synchronous=FULL``: once :meth:`RunLog.append` returns, the
event survives a kill -9 or a power cut, and a kill during the write leaves the
log as it was before it. A run's state is a pure function of its events
(:mod:`longkv.agent.state`), so ``resume`` rebuilds it exactly.

Who drives a run is decided by an exclusive ``flock`` on ``locks/RUN.lock``,
which holds the owner's pid: the kernel drops the lock when the owner dies,
however it dies, so a run is never left stuck "running".
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longkv.errors import LongKVError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, workdir TEXT NOT NULL, created REAL NOT NULL,
    status TEXT NOT NULL, answer TEXT, reason TEXT
);
CREATE TABLE IF NOT EXISTS events (
    run TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL, t REAL NOT NULL,
    PRIMARY KEY (run, seq)
);
"""


@dataclass(frozen=True)
class Event:
    """One logged event: ``kind`` (start, request, reply, tool_start, tool_result, note, loop, end) and its data."""

    seq: int
    kind: str
    data: dict[str, Any]
    t: float


@dataclass(frozen=True)
class RunInfo:
    """A run's row: ``status`` is running, finished, stopped or failed (``interrupted`` when its owner is gone)."""

    id: str
    task: str
    workdir: str
    created: float
    status: str
    answer: str | None
    reason: str | None


class RunLog:
    """The run log of one runs folder (created on first use, unless ``create`` is false: then a folder without a
    run log reads as one without runs, in memory, and nothing is written to disk).

    Raises :class:`~longkv.errors.LongKVError` when the folder cannot be created
    or the database cannot be opened.
    """

    def __init__(self, runs_dir: Path, create: bool = True) -> None:
        self.dir = Path(runs_dir).expanduser()
        try:
            if create:
                (self.dir / "locks").mkdir(parents=True, exist_ok=True)
            db = self.dir / "runs.db" if create or (self.dir / "runs.db").is_file() else ":memory:"
            self.db = sqlite3.connect(db, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LongKVError(f"cannot open the run log in {self.dir} ({exc}): pass --runs-dir to a writable folder") from None

    def close(self) -> None:
        self.db.close()

    def create(self, task: str, workdir: Path) -> str:
        """A new run's id (``YYYYMMDD-HHMMSS-xxxx``), its row written with status ``running``."""
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, 'running', NULL, NULL)", (run_id, task, str(workdir), time.time()))
        return run_id

    def append(self, run_id: str, kind: str, data: dict[str, Any]) -> Event:
        """Append one event (durable when this returns); an ``end`` event also sets the run's status."""
        t = time.time()
        payload = json.dumps(data, ensure_ascii=False)
        with self._tx():
            row = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run = ?", (run_id,)).fetchone()
            seq = int(row[0])
            self.db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (run_id, seq, kind, payload, t))
            if kind == "end":
                self.db.execute("UPDATE runs SET status = ?, answer = ?, reason = ? WHERE id = ?",
                                (data["status"], data.get("answer"), data.get("reason"), run_id))  # fmt: skip
            elif kind in ("start", "resume"):
                self.db.execute("UPDATE runs SET status = 'running', answer = NULL, reason = NULL WHERE id = ?", (run_id,))
        return Event(seq, kind, data, t)

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def events(self, run_id: str) -> list[Event]:
        rows = self.db.execute("SELECT seq, kind, data, t FROM events WHERE run = ? ORDER BY seq", (run_id,)).fetchall()
        return [Event(int(s), str(k), json.loads(d), float(t)) for s, k, d, t in rows]

    def info(self, run_id: str) -> RunInfo:
        """The run's row; a ``running`` run whose lock is free shows as ``interrupted``.

        Raises:
            LongKVError: no run with that id, or with that start or end of an id (e.g. its last 4 characters),
                in this folder; or more than one.
        """
        like = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.execute("SELECT * FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\' OR id LIKE ? ESCAPE '\\' ORDER BY created",
                               (run_id, like + "%", "%" + like)).fetchall()  # fmt: skip
        exact = [r for r in rows if r[0] == run_id]
        rows = exact or rows
        if not rows:
            raise LongKVError(f"no run {run_id!r} in {self.dir}: list them with longkv agent show, or pass --runs-dir")
        if len(rows) > 1:
            raise LongKVError(f"{run_id!r} matches {len(rows)} runs ({', '.join(r[0] for r in rows[:5])}): give more of the id")
        r = rows[0]
        status = str(r[4])
        if status == "running" and self.owner(str(r[0])) is None:
            status = "interrupted"
        return RunInfo(str(r[0]), str(r[1]), str(r[2]), float(r[3]), status, r[5], r[6])

    def runs(self, limit: int = 20) -> list[RunInfo]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM runs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()]
        return [self.info(i) for i in ids]

    def owner(self, run_id: str) -> int | None:
        """Pid of the process driving the run, or None when nobody holds its lock."""
        path = self.dir / "locks" / f"{run_id}.lock"
        if not path.exists():
            return None
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    def delete(self, run_id: str) -> int:
        """Remove a run: its row, its events, its lock and the KV snapshot an in-process run saved (``kv/RUN-*.kv``).
        Returns the bytes of the files removed.

        Raises:
            LongKVError: no such run, or a live process drives it.
        """
        info = self.info(run_id)
        freed = 0
        with self.drive(info.id):
            with self._tx():
                self.db.execute("DELETE FROM events WHERE run = ?", (info.id,))
                self.db.execute("DELETE FROM runs WHERE id = ?", (info.id,))
            for f in (self.dir / "kv").glob(f"{info.id}-*.kv"):
                freed += f.stat().st_size
                f.unlink()
            (self.dir / "locks" / f"{info.id}.lock").unlink(missing_ok=True)
        return freed

    @contextmanager
    def drive(self, run_id: str) -> Iterator[None]:
        """Hold the run's lock while driving it.

        Raises:
            LongKVError: another live process drives the run.
        """
        path = self.dir / "locks" / f"{run_id}.lock"
        with open(path, "a+") as f:  # closing the file drops the lock
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise LongKVError(f"run {run_id} is being driven by pid {f.read().strip() or '?'}: wait for it, or stop that process") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
