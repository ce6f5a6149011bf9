"""What a workdir holds, and what changed in it: snapshots of file sizes, mtimes and (optionally) contents.

The agent takes one before every call that may change files (a call cut off by a crash reports what changed
since, on resume), and ``bash``/``python`` report the files they created, modified or deleted. :func:`files`
lists what ``search`` reads.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

SNAPSHOT_FILES = 5000
"""Most files a workdir snapshot lists."""
SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
"""Folders that workdir snapshots and ``search`` leave out (version control, environments, tools' caches)."""
SPECIAL_DIRS = frozenset({"/proc", "/sys", "/dev", "/run"})
"""Kernel and runtime file systems a snapshot never walks into (their files can block a read, e.g. /proc/kmsg)."""
DIGEST_BYTES = 1 << 20
"""Files up to this size get a content digest in a snapshot taken with digests (64 MiB of them at most)."""


def snapshot(workdir: Path, digests: bool = False) -> dict[str, list[Any]]:
    """``[size, mtime_ns]`` of every file under ``workdir`` (at most SNAPSHOT_FILES) by relative path; with
    ``digests``, a third item: the file's BLAKE2b digest (hex) if it is at most DIGEST_BYTES, else None."""
    out: dict[str, list[Any]] = {}
    budget = 64 << 20
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and os.path.join(root, d) not in SPECIAL_DIRS]
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device: reading it could block for good
                continue
            row: list[Any] = [st.st_size, st.st_mtime_ns]
            if digests:
                hashed = st.st_size <= min(DIGEST_BYTES, budget)
                row.append(_digest(p) if hashed else None)
                budget -= st.st_size if hashed else 0
            out[os.path.relpath(p, workdir)] = row
            if len(out) >= SNAPSHOT_FILES:
                return out
    return out


def _digest(p: str) -> str | None:
    try:
        with open(p, "rb") as fh:
            return hashlib.blake2b(fh.read(DIGEST_BYTES + 1), digest_size=16).hexdigest()
    except OSError:
        return None


def changes(before: dict[str, list[Any]], after: dict[str, list[Any]], workdir: Path | None = None) -> list[str]:
    """What differs between two snapshots: ``"PATH (new)"``, ``"PATH (deleted)"``, ``"PATH (modified)"``. A file
    whose size or mtime changed counts as modified unless ``before`` holds its digest and the file under
    ``workdir`` still has it (rewritten with the same bytes)."""
    changed = [f"{p} (new)" for p in sorted(after.keys() - before.keys())]
    changed += [f"{p} (deleted)" for p in sorted(before.keys() - after.keys())]
    for p in sorted(before.keys() & after.keys()):
        if before[p][:2] == after[p][:2]:
            continue
        old = before[p][2] if len(before[p]) > 2 else None
        if old is not None and workdir is not None and _digest(os.path.join(workdir, p)) == old:
            continue
        changed.append(f"{p} (modified)")
    return changed


LISTED_FILES = 40
"""Most paths :func:`listing` names."""


def listing(workdir: Path, limit: int = LISTED_FILES) -> str:
    """One line that names the files under ``workdir`` (relative paths, shallow ones first, at most ``limit``,
    then how many more), for the task message: a model that sees where it is does not guess file names."""
    paths = sorted(snapshot(workdir), key=lambda p: (p.count(os.sep), p))
    if not paths:
        return "The working folder is empty."
    shown = ", ".join(p.replace(os.sep, "/") for p in paths[:limit])
    more = f", and {len(paths) - limit} more" if len(paths) > limit else ""
    count = f"{len(paths)} or more" if len(paths) >= SNAPSHOT_FILES else str(len(paths))
    return f"Files in the working folder ({count}): {shown}{more}."


def files(root: Path, glob: str | None) -> list[Path]:
    """The files ``search`` reads under ``root`` (itself, if a file) whose paths match ``glob`` as ``root.rglob`` would
    match them, sorted; the folders of SKIP_DIRS are never entered (a ``node_modules`` costs nothing)."""
    if root.is_file():
        return [root]
    pattern = ["**", *PurePosixPath(glob or "*").parts]
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        rel = Path(folder).relative_to(root).parts
        out += [p for n in names if glob_match([*rel, n], pattern) and (p := Path(folder, n)).is_file()]
    return sorted(out)


def glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts, ``**`` standing for any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and glob_match(parts[1:], pattern[1:])
