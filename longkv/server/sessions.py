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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longkv.engine.memory import KVMemory
from longkv.engine.runner import Runner
from longkv.errors import LongKVError

log = logging.getLogger("longkv.server")

# Boundaries of the messages of a prompt that lie after a token index: [(span kind, end, pinned)]
# in order; the last message's end may be before the prompt's end (the generation prompt follows).
Pieces = Callable[[int], list[tuple[str, int, bool]]]


@dataclass
class Prepared:
    """A session made ready for a prompt by :func:`prepare`.

    Attributes:
        matched: prompt tokens the session holds (as spans); ``new`` follows them.
        new: the prompt's tokens left to feed.
        pieces: the message ends after the session's last span at the time they were asked for.
        edits: what was done, in order (see docs/memory.md).
        partial: id of a span the prompt repeats only in part (its rest comes in ``new``), or None.
    """

    matched: int
    new: list[int]
    pieces: list[tuple[str, int, bool]]
    edits: list[dict[str, Any]]
    partial: int | None


def prepare(
    mem: KVMemory, ids: list[int], drop: list[int], tool_keep: float | None, pieces_of: Pieces | None, window: int, reply: int
) -> Prepared:
    """Turn the next prompt ``ids`` into edits of the session so that it and ``reply`` new tokens fit ``window``.

    In order: the spans named in ``drop`` lose their KV; the prompt is aligned with the
    spans (:meth:`KVMemory.align`); tool results a step has read whole are compressed to
    ``tool_keep``; messages that do not fit beside the pinned spans are fed one at a time,
    the oldest unpinned spans dropped as it goes (a long history sent to a new session);
    then the manager makes room for the rest (:meth:`KVMemory.fit`).

    Raises LongKVError: a bad span id, or pinned messages and the last message that alone pass the window.
    """
    limit = window - reply - 1  # KV tokens the prompt may end with
    edits: list[dict[str, Any]] = []
    if drop:
        named = list(dict.fromkeys(drop))
        edits.append({"drop": named, "tokens": mem.drop(named)})
    al = mem.align(ids)
    matched = al.matched
    if al.left_out:
        edits.append({"align": al.left_out})
    if al.cut or al.partial is not None:
        edits.append({"cut": al.cut + ([al.partial] if al.partial is not None else []), "tokens": al.freed})
    if tool_keep is not None:
        for s in list(mem.spans):
            if s.kind == "tool" and not s.pinned and not s.compressed and s.kept >= 64:
                edits.append({"compress": s.id, "tokens": mem.compress(s.id, tool_keep)})
    pieces = pieces_of(matched) if pieces_of is not None else []
    # what must fit whatever is dropped: the pinned spans, and the last message with the reply's start
    pinned = sum(s.kept for s in mem.spans if s.pinned)
    at, need_pinned, need = matched, pinned, 0
    for i, (_, end, pin) in enumerate(pieces):
        if pin:
            need_pinned += max(end - at, 0)
        elif i == len(pieces) - 1:
            need += max(end - at, 0)
        at = max(at, end)
    need += len(ids) - at
    if need_pinned + need > limit:
        raise LongKVError(
            f"the system prompt and task ({need_pinned} tokens, never dropped) and the last message ({need} "
            f"tokens) leave no room for max_tokens {reply} in the model's window of {window}: shorten them "
            "or lower max_tokens"
        )
    for kind, end, pin in pieces[:-1]:
        if pinned + len(ids) - matched <= limit or end <= matched:
            continue
        edits += mem.fit(max(limit - (end - matched), pinned), recent=0, keep=None)
        span, _ = mem.append(kind, ids[matched:end], pin)
        edits.append({"prefill": span.id, "tokens": end - matched})
        pinned += (end - matched) if pin else 0
        matched = end
    new = ids[matched:]
    edits += mem.fit(limit - len(new))
    mem.seq.cache.reserve(mem.tokens + len(new) + reply + 1)
    return Prepared(matched, new, pieces, edits, al.partial)


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
        self.stale: dict[str, str] = {}  # session -> why its snapshot was set aside by its latest open

    def path(self, session: str) -> Path:
        """The file of ``session`` in the memory folder. Asserts the server has one."""
        assert self.directory is not None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", session)[:64].lstrip(".")
        return self.directory / f"{safe}-{hashlib.sha256(session.encode()).hexdigest()[:12]}.kv"

    def open(self, session: str, runner: Runner) -> tuple[KVMemory, str]:
        """The session for one request, and where it came from: ``"ram"``, ``"disk"`` or ``"new"``.

        A snapshot this server cannot read (saved with another model, dtype or weight format, another
        snapshot version, a damaged file) is logged and set aside: the session starts afresh (the client's
        prompt holds the history, so that costs a prefill, never a wrong answer), :attr:`stale` says why,
        and the session's next save replaces the file.

        Raises SessionBusy when the session is answering another request.
        """
        if session in self._open:
            raise SessionBusy(f"session {session!r} is answering another request: send a session's requests one at a time")
        mem = self._idle.pop(session, None)
        source = "ram"
        self.stale.pop(session, None)
        path = self.path(session) if self.directory is not None else None
        if mem is None and path is not None and path.is_file():
            try:
                mem, source = KVMemory.load(path, runner, self.fingerprint), "disk"
                self.loaded += 1
            except LongKVError as exc:
                log.warning("KV memory session %r starts afresh: %s", session, exc)
                self.stale[session] = str(exc).replace(str(path), "its snapshot")  # no server path in a reply
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
