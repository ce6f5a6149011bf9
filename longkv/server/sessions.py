"""The server's KV memory sessions: in RAM under a byte budget, written to disk when asked or pushed out.

A session (:class:`~longkv.engine.memory.KVMemory`) is open for one request at a
time. Between requests it stays in RAM; when the sessions together hold more
than the budget, the least recently used idle ones leave RAM, saved first to the
memory folder when the server has one (``--memory-dir``), so a later request on
them reads their KV back instead of prefilling it again. A session's file name
is its id made safe for a file system, plus a hash of the id.

Not thread-safe: the engine thread alone opens and closes sessions.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from pathlib import Path

from longkv.engine.memory import KVMemory
from longkv.engine.runner import Runner
from longkv.errors import LongKVError

log = logging.getLogger("longkv.server")


class SessionBusy(LongKVError):
    """A request names a session that is answering another request (HTTP 409)."""


class SessionStore:
    """KV memory sessions by id.

    Args:
        capacity_bytes: most KV bytes the idle sessions hold in RAM together.
        directory: where sessions are saved (``None``: nowhere; a session pushed out of RAM is lost).
        fingerprint: what decided the KV bytes (model, dtype, weights); a saved session
            with another one is refused.
    """

    def __init__(self, capacity_bytes: int, directory: Path | None, fingerprint: str) -> None:
        self.capacity = capacity_bytes
        self.directory = directory
        self.fingerprint = fingerprint
        self._idle: OrderedDict[str, KVMemory] = OrderedDict()  # least recently used first
        self._open: dict[str, KVMemory] = {}
        self.loaded = 0  # sessions read back from disk
        self.pushed_out = 0  # sessions that left RAM for lack of room

    def path(self, session: str) -> Path:
        """The file of ``session`` in the memory folder. Asserts the server has one."""
        assert self.directory is not None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", session)[:64].lstrip(".")
        return self.directory / f"{safe}-{hashlib.sha256(session.encode()).hexdigest()[:12]}.kv"

    def open(self, session: str, runner: Runner) -> tuple[KVMemory, str]:
        """The session for one request, and where it came from: ``"ram"``, ``"disk"`` or ``"new"``.

        Raises SessionBusy when the session is answering another request; LongKVError when its file cannot be read.
        """
        if session in self._open:
            raise SessionBusy(f"session {session!r} is answering another request: send a session's requests one at a time")
        mem = self._idle.pop(session, None)
        source = "ram"
        if mem is None and self.directory is not None and self.path(session).is_file():
            mem, source = KVMemory.load(self.path(session), runner, self.fingerprint), "disk"
            self.loaded += 1
        if mem is None:
            mem, source = KVMemory(runner), "new"
        self._open[session] = mem
        return mem, source

    def close(self, session: str, save: bool = False) -> int | None:
        """The request on ``session`` is over: it goes back to RAM (most recently used); returns the bytes
        written when ``save``. Raises OSError when the file cannot be written (the session stays in RAM),
        LongKVError without a memory folder."""
        mem = self._open.pop(session)
        self._idle[session] = mem
        try:
            if save:
                if self.directory is None:
                    raise LongKVError("this server has no memory folder: start it with --memory-dir DIR to save sessions")
                return mem.save(self.path(session), self.fingerprint)
            return None
        finally:
            self._push_out()

    def save_all(self) -> int:
        """Save every idle session to the memory folder (the server is stopping); returns how many. No folder: 0."""
        if self.directory is None:
            return 0
        n = 0
        for session, mem in self._idle.items():
            try:
                mem.save(self.path(session), self.fingerprint)
                n += 1
            except OSError as exc:
                log.error("KV memory session %s could not be saved at shutdown: %s", session, exc)
        return n

    def forget(self, session: str) -> None:
        """Drop an open session whose state cannot be trusted (its request failed mid-edit)."""
        mem = self._open.pop(session, None)
        if mem is not None:
            mem.seq.cache.clear()

    def bytes(self) -> int:
        """KV bytes of every session in RAM."""
        return sum(m.bytes() for m in self._idle.values()) + sum(m.bytes() for m in self._open.values())

    def __len__(self) -> int:
        return len(self._idle) + len(self._open)

    def _push_out(self) -> None:
        while self._idle and sum(m.bytes() for m in self._idle.values()) > self.capacity:
            session, mem = self._idle.popitem(last=False)
            if self.directory is not None:
                try:
                    mem.save(self.path(session), self.fingerprint)
                except OSError as exc:  # lost from RAM all the same: a later request prefills it again
                    log.error("KV memory session %s could not be saved on its way out of RAM: %s", session, exc)
            mem.seq.cache.clear()
            self.pushed_out += 1
