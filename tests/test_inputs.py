"""Collecting ask's inputs: files, folders, stdin; clear errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from longkv.errors import LongKVError
from longkv.inputs import build_prompt, collect


def test_folder_is_read_recursively_text_only(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def main():\n    pass\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# notes\n")
    (tmp_path / "sub" / "img.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".env").write_text("TOKEN=secret\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs, skipped = collect([str(tmp_path)])
    assert [Path(d.name).name for d in docs] == ["a.py", "b.md"]
    assert sorted(Path(s).name for s in skipped) == ["img.png", "latin1.txt"]


def test_prompt_names_files_and_puts_the_question_last(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("alpha")
    (tmp_path / "y.txt").write_text("beta")
    docs, _ = collect([str(tmp_path / "x.txt"), str(tmp_path / "y.txt")])
    prompt = build_prompt(docs, "  Which letters?  ")
    assert prompt.index("x.txt") < prompt.index("alpha") < prompt.index("y.txt") < prompt.index("beta")
    assert prompt.endswith("### Question\nWhich letters?")


def test_stdin() -> None:
    docs, _ = collect(["-"], stdin_text="hello from a pipe")
    assert docs[0].name == "<stdin>" and docs[0].text == "hello from a pipe"


@pytest.mark.parametrize("data", ["caf\xe9 text\n".encode("latin-1"), b"\x00\x01binary"])
def test_stdin_that_is_not_utf8_text_is_refused(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes read as bytes: a locale's decoding would pass them on as surrogates, which no tokenizer takes."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    with pytest.raises(LongKVError, match="standard input is binary or not UTF-8: pipe text"):
        collect(["-"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café\n".encode()), encoding="utf-8"))
    assert collect(["-"])[0][0].text == "café\n"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("x")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(LongKVError, match="cannot read it \\(Permission denied\\): check its permissions"):
        collect([str(f)])


def test_no_input_and_all_empty(tmp_path: Path) -> None:
    with pytest.raises(LongKVError, match="no input given"):
        collect([])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(LongKVError, match="input is empty"):
        collect([str(tmp_path)])


def test_an_empty_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(LongKVError, match="empty: the folder holds no files to read"):
        collect([str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(LongKVError, match="the input is empty: pass files with some text"):
        collect([str(tmp_path / "blank.txt")])


def test_each_file_is_read_once_however_often_it_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cli.py").write_text("def main(): pass\n")
    (tmp_path / "README").write_text("a tool\n")
    monkeypatch.chdir(tmp_path)
    docs, _ = collect([".", "src/cli.py", "./README", str(tmp_path / "src"), "-", "-"], stdin_text="piped")
    assert [d.name for d in docs] == ["README", "src/cli.py", "<stdin>"]
