"""Turn ``ask``'s arguments (files, folders, ``-`` for stdin) into one prompt text.

Each file is introduced by its path so the model can tell them apart. Folders
are read recursively, text files only (binary files and hidden or build folders
are skipped); a file named explicitly must be text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from longkv.errors import LongKVError

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist"}
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One input: where it came from and its text."""

    name: str
    text: str


def _read_text(path: Path) -> str | None:
    """The file's text, or None if it looks binary (NUL bytes or not UTF-8)."""
    return _text_of(path.read_bytes())


def _text_of(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or None if it looks binary (NUL bytes or not UTF-8)."""
    if b"\x00" in data[:SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def collect(paths: list[str], stdin_text: str | None = None) -> tuple[list[Document], list[str]]:
    """Read every input.

    Args:
        paths: files, folders, or ``-`` for standard input.
        stdin_text: text to use for ``-`` (default: read ``sys.stdin``).

    Returns:
        (documents, skipped paths inside folders). Each file is read once, however many
        times the paths name it (a file and a folder holding it, ``-`` twice).

    Raises:
        LongKVError: a missing path, an explicit file that is binary or unreadable,
            or no text at all.
    """
    if not paths:
        raise LongKVError("no input given: pass files, folders, or - to read standard input")
    docs: list[Document] = []
    skipped: list[str] = []
    seen: set[str] = set()  # each input once: a file also inside a folder given, a path or - given twice

    def first(key: str) -> bool:
        new = key not in seen
        seen.add(key)
        return new

    for p in paths:
        if p == "-":
            if not first("-"):
                continue
            if stdin_text is None:  # bytes: a locale's decoding would turn bytes that are not UTF-8 into surrogates
                read = _text_of(sys.stdin.buffer.read())
                if read is None:
                    raise LongKVError("standard input is binary or not UTF-8: pipe text into it (e.g. iconv -f latin1 -t utf-8)")
                stdin_text = read
            docs.append(Document("<stdin>", stdin_text))
            continue
        path = Path(p)
        if not path.exists():
            raise LongKVError(f"{p}: no such file or folder: check the path")
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                # hidden files and folders (.git, .env, ...) and build folders are not documents
                if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts) or not f.is_file() or not first(str(f.resolve())):
                    continue
                try:
                    text = _read_text(f)
                except OSError:
                    text = None
                if text is None:
                    skipped.append(str(f))
                else:
                    docs.append(Document(str(f), text))
            continue
        if not first(str(path.resolve())):
            continue
        try:
            text = _read_text(path)
        except OSError as exc:
            raise LongKVError(f"{p}: cannot read it ({exc.strerror}): check its permissions") from None
        if text is None:
            raise LongKVError(f"{p}: file is binary or not UTF-8: pass text files or a folder")
        docs.append(Document(str(path), text))
    if not any(d.text.strip() for d in docs):
        if skipped:  # a folder of binaries: say what was found, not just "empty"
            more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
            raise LongKVError(
                f"no text in the input: {len(skipped)} binary or non-UTF-8 file(s) skipped ({skipped[0]}{more}): "
                f"pass text files or folders that hold some"
            )
        folders = [p for p in paths if p != "-" and Path(p).is_dir()]
        if folders and not docs:  # a folder with no file in it (hidden and build folders are not read)
            raise LongKVError(f"{folders[0]}: the folder holds no files to read (hidden files and folders such as .git are "
                              "skipped): pass a folder or files with text in them")
        raise LongKVError("the input is empty: pass files with some text in them")
    return docs, skipped


def build_prompt(docs: list[Document], question: str) -> str:
    """The user message: every document under its name, then the question last.

    The question comes after the documents so that a policy which keeps only
    recent tokens (streaming) still sees it.
    """
    parts = []
    for d in docs:
        parts.append(f"### File: {d.name}\n{d.text.rstrip()}\n" if len(docs) > 1 or d.name != "<stdin>" else d.text.rstrip() + "\n")
    return "\n".join(parts) + f"\n### Question\n{question.strip()}"
