"""The agent runtime against a scripted model server: tools, the loop's stop and recovery rules, the context
window, the run log, resume after kill -9, and the CLI."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fake import FakeServer, scripted, tokens, tool_results
from rich.console import Console

from longkv.agent import Agent, ToolContext, ToolError, tool
from longkv.agent.agent import find_loop, spread_error
from longkv.agent.cli import gist
from longkv.agent.runlog import RunLog
from longkv.agent.sandbox import Limits, Sandbox, sandbox_problem
from longkv.agent.show import render, steps, summary
from longkv.agent.state import PLAN_NEXT, RunState, partial_string
from longkv.agent.tools import (
    READ_CHARS,
    READ_LINES,
    Toolbox,
    bash,
    edit_file,
    is_step_list,
    python,
    rank_results,
    read_file,
    recall,
    search,
    write_file,
)
from longkv.agent.workdir import listing, snapshot
from longkv.errors import LongKVError

SANDBOX = sandbox_problem() is None
needs_sandbox = pytest.mark.skipif(not SANDBOX, reason=f"no sandbox here: {sandbox_problem()}")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def _agent(server: FakeServer, work: Path, tmp_path: Path, **kw: Any) -> Agent:
    return Agent(server=server.url, workdir=work, runs_dir=tmp_path / "runs", sandbox=kw.pop("sandbox", SANDBOX), **kw)


# --------------------------------------------------------------------------- tools


def test_a_tool_schema_comes_from_the_signature_and_docstring() -> None:
    @tool(idempotent=True)
    def lookup(ctx: ToolContext, key: str, limit: int = 5, exact: bool | None = None, tags: list[str] | None = None) -> str:
        """Look a key up in the index.

        Args:
            key: what to look up.
            limit: most results
                (continued on a second line).
            exact: whole words only.
            tags: only entries with these tags.
        """
        return f"{key}:{limit}"

    s = lookup.schema()["function"]
    assert s["name"] == "lookup" and s["description"] == "Look a key up in the index."
    assert s["parameters"] == {
        "type": "object",
        "properties": {
            "key": {"type": "string", "description": "what to look up."},
            "limit": {"type": "integer", "description": "most results (continued on a second line)."},
            "exact": {"type": "boolean", "description": "whole words only."},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "only entries with these tags."},
        },
        "required": ["key"],
        "additionalProperties": False,
    }
    ctx = ToolContext(Path("."), None)
    assert lookup.idempotent and lookup.call(ctx, {"key": "a", "limit": 2}) == "a:2"
    for bad, msg in (({}, "needs 'key'"), ({"key": 1}, "must be a string"), ({"key": "a", "limit": "2"}, "'limit' must be an integer, got \"2\""),
                     ({"key": "a", "x": 1}, "has no argument 'x'")):  # fmt: skip
        with pytest.raises(ToolError, match=msg):
            lookup.call(ctx, bad)
    with pytest.raises(LongKVError, match="no docstring"):
        tool(lambda ctx, a: a)
    with pytest.raises(LongKVError, match="no JSON schema"):

        @tool
        def bad(ctx: ToolContext, a: set) -> str:  # type: ignore[type-arg]
            """Bad."""
            return ""
    with pytest.raises(LongKVError, match=r"tool unresolved: an argument's type annotation cannot be read \(name 'datetime' is not defined\)"):

        @tool
        def unresolved(ctx: ToolContext, when: datetime.date) -> str:  # type: ignore[name-defined]  # noqa: F821
            """Bad."""
            return ""

    assert [t for t in Toolbox.of([lookup]).tools][-1] == "lookup"


def test_read_file_shows_a_window_and_names_the_next_start(work: Path) -> None:
    """A file is read in windows of at most READ_LINES lines and READ_CHARS characters (whole lines), each naming
    where the next starts (a start of 0 or less reads from the top); one line longer than a window shows its head
    and says how to see the rest."""
    ctx = ToolContext(work, None)
    (work / "long.txt").write_text("".join(f"row {i}\n" for i in range(1, 451)))
    first = read_file.call(ctx, {"path": "long.txt"})
    assert first.splitlines()[0] == "    1  row 1" and first.splitlines()[-2] == f"{READ_LINES:>5}  row {READ_LINES}"
    assert first.endswith(f"[{450 - READ_LINES} more lines: read_file with start={READ_LINES + 1}]")
    assert read_file.call(ctx, {"path": "long.txt", "start": 401}).splitlines() == [f"{i:>5}  row {i}" for i in range(401, 451)]
    assert read_file.call(ctx, {"path": "long.txt", "start": 451}) == "[long.txt has 450 lines: start must be at most 450]"
    assert read_file.call(ctx, {"path": "long.txt", "start": 0}) == first == read_file.call(ctx, {"path": "long.txt", "start": -3})
    (work / "wide.txt").write_text("".join("x" * 99 + "\n" for _ in range(100)))
    wide = read_file.call(ctx, {"path": "wide.txt"}).splitlines()
    shown = len(wide) - 1
    assert sum(len(r) + 1 for r in wide[:-1]) <= READ_CHARS < sum(len(r) + 1 for r in wide[:-1]) + len(wide[1]) + 1
    assert wide[-1] == f"[{100 - shown} more lines: read_file with start={shown + 1}]"
    (work / "dump.json").write_text('{"a": "' + "y" * 20_000 + '"}\n[]\n')
    dump = read_file.call(ctx, {"path": "dump.json"}).splitlines()
    assert dump[0].endswith("[line 1 cut: 20009 characters; bash (cut -c) shows the rest]") and len(dump[0]) < READ_CHARS + 80
    assert dump[1] == "[1 more lines: read_file with start=2]"
    (work / "empty.txt").write_text("")
    assert read_file.call(ctx, {"path": "empty.txt"}) == "[empty.txt is empty]"
    assert "end" not in read_file.parameters["properties"]


def test_bash_and_python_name_the_files_they_changed(work: Path) -> None:
    """A sandbox call's result ends with the workdir files it created, modified or deleted; a silent call that
    changed nothing says so (sed -i rewrites a file even when nothing matched: same bytes, no change)."""
    ctx = ToolContext(work, Sandbox(work, Limits(wall_s=30), enabled=SANDBOX))
    (work / "shop").mkdir()
    (work / "shop/pricing.py").write_text("def calc_total(x):\n    return x\n")
    (work / "old.txt").write_text("x")
    assert bash.call(ctx, {"command": "sed -i 's/calc_total/compute_total/' shop/pricing.py"}) == \
        "[exit code 0]\n[files changed: shop/pricing.py (modified)]"
    assert bash.call(ctx, {"command": "sed -i 's/calc_total/compute_total/' shop/pricing.py"}) == "[exit code 0]\n[no file changed]"
    assert bash.call(ctx, {"command": "ls shop"}) == "pricing.py\n[exit code 0]"  # it printed something: no marker
    assert bash.call(ctx, {"command": "rm old.txt; echo 1 > new.txt; mkdir -p .pytest_cache; echo c > .pytest_cache/x"}) == \
        "[exit code 0]\n[files changed: new.txt (new), old.txt (deleted)]"
    assert python.call(ctx, {"code": "open('new.txt', 'w').write('2')\nprint('ok')"}) == "ok\n[exit code 0]\n[files changed: new.txt (modified)]"


def test_search_with_a_glob_that_names_no_file_searches_them_all(work: Path) -> None:
    """A glob that matches none of the files under the path: every file is searched and the result says so; a glob
    that matches some files narrows the search as asked."""
    ctx = ToolContext(work, None)
    (work / "data").mkdir()
    (work / "data/part-1.txt").write_text("a\nAPI_TOKEN=tok_1\n")
    (work / "data/part-2.txt").write_text("b\n")
    assert search.call(ctx, {"pattern": "API_TOKEN", "path": "data", "glob": ".*py"}) == (
        "1 matching line in 1 file (the glob '.*py' matches none of the 2 files under data: all were searched):\n"
        "data/part-1.txt:2: API_TOKEN=tok_1")
    assert search.call(ctx, {"pattern": "zzz", "glob": "*.py"}) == (
        "no match for 'zzz' in 2 files (the glob '*.py' matches none of the 2 files under .: all were searched)")
    assert search.call(ctx, {"pattern": "b", "glob": "part-2*"}) == "1 matching line in 1 file:\ndata/part-2.txt:1: b"


def test_search_globs_match_as_rglob_does_and_cache_folders_are_never_entered(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """search's file list equals ``rglob``'s for globs with folders and ``**``, minus the SKIP_DIRS folders, which
    the walk never opens (a large node_modules costs nothing)."""
    from longkv.agent import workdir as workdir_mod

    for rel in ("a.py", "src/b.py", "src/pkg/c.py", "src/pkg/d.txt", "docs/src/e.py", ".hidden.py",
                "node_modules/m/x.py", "src/__pycache__/b.cpython.py", ".git/config"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("hit\n")
    for glob_ in (None, "*.py", "src/*.py", "src/**/*.py", "**/*.txt", "pkg", "*/pkg/*", "[ab].py", "*"):
        want = sorted(f for f in work.rglob(glob_ or "*")
                      if f.is_file() and not {"node_modules", "__pycache__", ".git"} & set(f.relative_to(work).parts))
        assert workdir_mod.files(work, glob_) == want, glob_
    opened: list[str] = []
    walk = os.walk
    monkeypatch.setattr(workdir_mod.os, "walk", lambda top: ((opened.append(d), (d, ds, fs))[1] for d, ds, fs in walk(top)))
    assert search.call(ToolContext(work, None), {"pattern": "hit", "glob": "*.py"}).startswith("5 matching lines in 5 files:")
    assert sorted(Path(d).relative_to(work).as_posix() for d in opened) == [".", "docs", "docs/src", "src", "src/pkg"]


def test_a_tool_results_label_is_not_written_as_a_files_text(work: Path) -> None:
    """write_file content or edit_file new that is only a result's label ("result 3", "[result 12]") is refused and
    the file kept; a text that merely mentions a result is written."""
    ctx = ToolContext(work, None)
    (work / "notes.txt").write_text("draft\n")
    read_file.call(ctx, {"path": "notes.txt"})
    for content in ("result 3", " [result 12]\n", "Result 7"):
        with pytest.raises(ToolError) as e:
            write_file.call(ctx, {"path": "notes.txt", "content": content})
        assert str(e.value) == ("write_file: notes.txt was not changed: content is only the label of a tool result ([result N]), not "
                                "its text: send the text itself")  # the same text for every label: a loop of them is seen
    with pytest.raises(ToolError, match=r"edit_file: notes.txt was not changed: new is only the label"):
        edit_file.call(ctx, {"path": "notes.txt", "old": "draft", "new": "result 4"})
    assert (work / "notes.txt").read_text() == "draft\n"
    assert write_file.call(ctx, {"path": "notes.txt", "content": "result 3 was wrong\n"}).startswith("wrote notes.txt (1 line")


def test_edit_file_refuses_a_short_text_inside_a_longer_word(work: Path) -> None:
    """An edit of one or two characters that sit inside a longer word or number ("5" in "5432") is refused with the
    word and its line, the file unchanged; the same characters standing alone are edited."""
    ctx = ToolContext(work, None)
    (work / "app.json").write_text('{"port": 8080,\n "db": "db:5432"}\n')
    with pytest.raises(ToolError, match=r"edit_file: '5' is part of '5432' \(line 2\) in app.json: give the whole word or line as old"):
        edit_file.call(ctx, {"path": "app.json", "old": "5", "new": "1"})
    assert (work / "app.json").read_text() == '{"port": 8080,\n "db": "db:5432"}\n'
    (work / "a.py").write_text("x = 1\ny = 22\n")
    assert edit_file.call(ctx, {"path": "a.py", "old": "x", "new": "z"}) == "edited a.py at line 1 (1 line -> 1 line); lines 1-2 now:\n    1  z = 1\n    2  y = 22"
    assert (work / "a.py").read_text() == "z = 1\ny = 22\n"


def test_edit_file_shows_what_it_left_and_deletes_whole_lines(work: Path) -> None:
    """An edit's result shows the lines around its new text (two before and after, at most 12, numbered as read_file
    numbers them); whole lines replaced by nothing are deleted, newline and all, not left empty."""
    ctx = ToolContext(work, None)
    (work / "users.txt").write_text("".join(f"{u}:{i}\n" for i, u in enumerate(["root", "alice", "bob", "mallory", "dave", "erin"])))
    out = edit_file.call(ctx, {"path": "users.txt", "old": "mallory:3", "new": ""})
    assert out == "edited users.txt at line 4 (1 line -> 0 lines); lines 2-5 now:\n    2  alice:1\n    3  bob:2\n    4  dave:4\n    5  erin:5"
    assert (work / "users.txt").read_text() == "root:0\nalice:1\nbob:2\ndave:4\nerin:5\n"
    edit_file.call(ctx, {"path": "users.txt", "old": "ali", "new": ""})  # part of a line: only that part goes
    assert (work / "users.txt").read_text() == "root:0\nce:1\nbob:2\ndave:4\nerin:5\n"
    out = edit_file.call(ctx, {"path": "users.txt", "old": "bob:2", "new": "\n".join(f"u{k}" for k in range(20))})
    assert out.splitlines()[0] == "edited users.txt at line 3 (1 line -> 20 lines); lines 1-12 now:" and len(out.splitlines()) == 13
    (work / "one.txt").write_text("only\n")
    assert edit_file.call(ctx, {"path": "one.txt", "old": "only", "new": ""}) == "edited one.txt at line 1 (1 line -> 0 lines); the file is now empty"


def test_shell_mistakes_get_a_hint(work: Path) -> None:
    """bash: a tool name or an interactive editor run as a command (exit 127) gets a line that says what to do
    instead; another missing command gets none. python: a shell command sent as code is refused, not run."""
    ctx = ToolContext(work, Sandbox(work, Limits(wall_s=30), enabled=SANDBOX))
    (work / "a.txt").write_text("x\n")
    out = bash.call(ctx, {"command": "read_file a.txt"})
    assert out.endswith("[exit code 127]\n[read_file is one of your tools, not a shell command: call the read_file tool itself]")
    out = bash.call(ctx, {"command": "nano a.txt"})
    assert out.endswith("[exit code 127]\n[there is no interactive editor here: change files with edit_file or write_file]")
    assert bash.call(ctx, {"command": "no_such_program_xyz"}).endswith("command not found\n[exit code 127]")
    with pytest.raises(ToolError, match=r"python: 'python report.py' is a shell command, not Python: run it with the bash tool"):
        python.call(ctx, {"code": "python report.py"})
    assert python.call(ctx, {"code": "ls = [1]\nprint(ls)"}) == "[1]\n[exit code 0]"  # a shell word that is Python here


def test_the_task_message_lists_the_workdir(work: Path, tmp_path: Path) -> None:
    """The task message ends with the workdir's files (shallow first, at most 40, then how many more, tools' caches
    left out); an empty workdir says so; a resumed run sends the listing of its start, not a new one."""
    (work / "src").mkdir()
    (work / "src/app.py").write_text("x = 1\n")
    (work / "README.md").write_text("hi\n")
    (work / ".git").mkdir()
    (work / ".git/HEAD").write_text("ref\n")
    assert listing(work) == "Files in the working folder (2): README.md, src/app.py."
    for i in range(45):
        (work / f"f{i:02d}.txt").write_text("")
    many = listing(work)
    assert many.startswith("Files in the working folder (47): README.md, f00.txt,") and many.endswith("f38.txt, and 7 more.")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert listing(empty) == "The working folder is empty."
    server = FakeServer(lambda msgs: {"calls": [("finish", {"answer": "ok"})]})
    with _agent(server, empty, tmp_path) as agent:
        res = agent.run("Say ok")
    server.close()
    assert server.requests[0]["messages"][1]["content"] == "Say ok\n\nThe working folder is empty."
    (empty / "late.txt").write_text("")
    assert RunState.replay(RunLog(tmp_path / "runs").events(res.run)).front()[1]["content"] == "Say ok\n\nThe working folder is empty."


def test_text_pasted_with_read_files_line_numbers_loses_the_numbers(work: Path) -> None:
    """write_file content, or an edit's old or new text, whose lines all start with increasing numbers as read_file
    shows them (some lines may be left out) is taken without the numbers when the file's own lines have none, and
    the result says so; a new file is not written from such a paste; numbers that are data stay."""
    ctx = ToolContext(work, None)
    (work / "inventory.csv").write_text("sku,qty\nA100,120\n")
    read_file.call(ctx, {"path": "inventory.csv"})
    out = write_file.call(ctx, {"path": "inventory.csv", "content": "1  sku,qty\n2  A100,120\n3  B205,40\n"})
    assert out == "wrote inventory.csv (3 lines, 25 bytes); read_file's line numbers were removed from what you sent"
    assert (work / "inventory.csv").read_text() == "sku,qty\nA100,120\nB205,40\n"
    # a line left out of the paste (the one to delete), numbers padded as read_file pads them, a blank line's number alone
    write_file.call(ctx, {"path": "inventory.csv", "content": "    1  sku,qty\n    3  B205,40\n    4\n    5      C7,1"})
    assert (work / "inventory.csv").read_text() == "sku,qty\nB205,40\n\n    C7,1"
    out = edit_file.call(ctx, {"path": "inventory.csv", "old": "    2  B205,40", "new": "    2  B205,41\n    3  D1,2"})
    assert out.splitlines()[0] == ("edited inventory.csv at line 2 (1 line -> 2 lines); read_file's line numbers were removed from what you "
                                   "sent; lines 1-5 now:")
    assert (work / "inventory.csv").read_text() == "sku,qty\nB205,41\nD1,2\n\n    C7,1"
    # a part of the file pasted over the whole of it (an edit's result, a window of read_file) is refused
    before = (work / "inventory.csv").read_text()
    for part in ("    2  B205,41\n    3  D1,2", "    1  sku,qty\n    2  B205,41"):
        with pytest.raises(ToolError, match=r"content is lines \d-\d of its 5 \(with read_file's line numbers\), and write_file "
                                            r"replaces the whole file: change a part of a file with edit_file"):
            write_file.call(ctx, {"path": "inventory.csv", "content": part})
    assert (work / "inventory.csv").read_text() == before
    with pytest.raises(ToolError, match=r"write_file: fresh.csv was not written: content starts its lines with read_file's line numbers"):
        write_file.call(ctx, {"path": "fresh.csv", "content": "    1  a\n    2  b\n"})
    assert not (work / "fresh.csv").exists()
    # a new file whose own lines start with numbers (not padded as read_file pads them), a TSV with an id column
    write_file.call(ctx, {"path": "ranks.md", "content": "1  gold\n2  silver\n"})
    assert (work / "ranks.md").read_text() == "1  gold\n2  silver\n"
    write_file.call(ctx, {"path": "ids.tsv", "content": "1\talice\n2\tbob\n"})
    write_file.call(ctx, {"path": "ids.tsv", "content": "1\talice\n2\tbob\n3\tcy\n"})
    assert (work / "ids.tsv").read_text() == "1\talice\n2\tbob\n3\tcy\n"
    # numbers that are data: one line, or not on every line, one space after them, not increasing
    for text in ("1  apple\n", "1  a\nb\n2  c\n", "1 a\n2 b\n", "2  b\n1  a\n"):
        write_file.call(ctx, {"path": "inventory.csv", "content": text})
        assert (work / "inventory.csv").read_text() == text
    # a file numbered itself keeps the numbers it is sent
    (work / "ranks.txt").write_text("1  ann\n2  bo\n")
    read_file.call(ctx, {"path": "ranks.txt"})
    write_file.call(ctx, {"path": "ranks.txt", "content": "1  ann\n2  bo\n3  cy\n"})
    assert (work / "ranks.txt").read_text() == "1  ann\n2  bo\n3  cy\n"


def test_write_file_drops_a_code_fence_and_says_what_the_old_text_lost(work: Path) -> None:
    """Content that is one Markdown code block is written without its fence (not in Markdown files, nor over a
    file that opens with one); a write over an existing file says how many of its lines the new text lacks."""
    ctx = ToolContext(work, None)
    (work / "app.ini").write_text("[server]\nport = 80\n[db]\npool_size = 5\n")
    read_file.call(ctx, {"path": "app.ini"})
    out = write_file.call(ctx, {"path": "app.ini", "content": "```ini\n[db]\npool_size = 25\n```"})
    assert out == "wrote app.ini (2 lines, 20 bytes); the ``` fence around it was removed; lines of the old text not in the new one: 3 of 4"
    assert (work / "app.ini").read_text() == "[db]\npool_size = 25\n"
    assert write_file.call(ctx, {"path": "new.py", "content": "```python\nx = 1\n```\n"}).endswith("the ``` fence around it was removed")
    assert (work / "new.py").read_text() == "x = 1\n"
    for path, text in (("doc.md", "```\ncode\n```\n"), ("two.py", "```\na = 1\n```\nb = 2\n```\n")):
        assert write_file.call(ctx, {"path": path, "content": text}).startswith(f"wrote {path}")
        assert (work / path).read_text() == text


def test_edit_file_errors_say_where(work: Path) -> None:
    """An edit whose text is not in the file names the closest line (number and text); one whose text occurs more
    than once names the lines; the file is unchanged either way."""
    ctx = ToolContext(work, None)
    body = "def adults(people):\n    return [p for p in people if p[\"age\"] > 18]\n"
    (work / "people.py").write_text(body)
    with pytest.raises(ToolError, match=r"""not in people.py; the closest line is 2: '    return \[p for p in people if p\["age"\] > 18\]': copy"""):
        edit_file.call(ctx, {"path": "people.py", "old": "return [p for p in people if p['age'] > 18]", "new": "x = 1"})
    with pytest.raises(ToolError, match=r"the text to replace is not in people.py: copy the lines exactly"):
        edit_file.call(ctx, {"path": "people.py", "old": "import zzz_unrelated_module", "new": "x = 1"})
    (work / "settings.toml").write_text("[app]\ndebug = true\n[storage]\ndebug = true\n")
    with pytest.raises(ToolError, match=r"occurs 2 times in settings.toml \(at lines 2, 4\): include more surrounding lines"):
        edit_file.call(ctx, {"path": "settings.toml", "old": "debug = true", "new": "debug = false"})
    assert (work / "people.py").read_text() == body and (work / "settings.toml").read_text() == "[app]\ndebug = true\n[storage]\ndebug = true\n"


def test_write_file_replaces_an_existing_file_only_after_the_run_read_it(work: Path) -> None:
    """Overwriting a non-empty file the run has not read (or written, or edited) is refused with the file untouched;
    after read_file it goes through; a new or empty file needs no read. Paths count as the same file however spelt."""
    ctx = ToolContext(work, None)
    (work / "conf").mkdir()
    (work / "conf/settings.toml").write_text("[app]\ndebug = true\n[storage]\ndebug = true\n")
    with pytest.raises(ToolError, match="conf/settings.toml exists and you have not read it: call read_file on it first"):
        write_file.call(ctx, {"path": "conf/settings.toml", "content": "[app]\ndebug = false\n"})
    assert (work / "conf/settings.toml").read_text() == "[app]\ndebug = true\n[storage]\ndebug = true\n"
    read_file.call(ctx, {"path": "./conf/../conf/settings.toml"})
    assert write_file.call(ctx, {"path": "conf/settings.toml", "content": "[app]\ndebug = false\n"}).startswith("wrote")
    (work / "empty.txt").write_text("")
    assert write_file.call(ctx, {"path": "empty.txt", "content": "x"}).startswith("wrote")
    assert write_file.call(ctx, {"path": "new/one.txt", "content": "1"}).startswith("wrote")
    assert write_file.call(ctx, {"path": "new/one.txt", "content": "2"}).startswith("wrote")  # written by the run: seen
    assert ctx.seen == {"./conf/../conf/settings.toml", "conf/settings.toml", "empty.txt", "new/one.txt"}


def test_file_tools(work: Path) -> None:
    ctx = ToolContext(work, None)
    assert write_file.call(ctx, {"path": "src/a.py", "content": "x = 1\ny = 2\nx = 1\n"}).startswith("wrote src/a.py (3 lines")
    assert read_file.call(ctx, {"path": "src/a.py", "start": 2}) == "    2  y = 2\n    3  x = 1"
    with pytest.raises(ToolError, match=r"occurs 2 times in src/a.py \(at lines 1, 3\): include more surrounding lines"):
        edit_file.call(ctx, {"path": "src/a.py", "old": "x = 1", "new": "x = 3"})
    with pytest.raises(ToolError, match="not in src/a.py; the closest line is 1: 'x = 1': copy the lines exactly"):
        edit_file.call(ctx, {"path": "src/a.py", "old": "z = 1", "new": "x = 3"})
    with pytest.raises(ToolError, match="old and new are the same text, so src/a.py would not change"):
        edit_file.call(ctx, {"path": "src/a.py", "old": "y = 2", "new": "y = 2"})
    with pytest.raises(ToolError, match=r"not in src/a.py: to add text, give as old a line that is there \(the last one is 'x = 1'\) and"):
        edit_file.call(ctx, {"path": "src/a.py", "old": "z = 9", "new": "z = 9\nz = 10"})  # an insertion with nothing to anchor it
    with pytest.raises(ToolError, match="old and new are the same text"):  # said before whether it is found at all
        edit_file.call(ctx, {"path": "src/a.py", "old": "w = 9", "new": "w = 9"})
    assert edit_file.call(ctx, {"path": "src/a.py", "old": "y = 2", "new": "y = 20\ny = 21"}) == \
        "edited src/a.py at line 2 (1 line -> 2 lines); lines 1-4 now:\n    1  x = 1\n    2  y = 20\n    3  y = 21\n    4  x = 1"
    assert (work / "src/a.py").read_text() == "x = 1\ny = 20\ny = 21\nx = 1\n"
    assert search.call(ctx, {"pattern": r"y = 2\d"}) == "2 matching lines in 1 file:\nsrc/a.py:2: y = 20\nsrc/a.py:3: y = 21"
    (work / "src/b.py").write_text("x = 1\n" * 150)
    assert search.call(ctx, {"pattern": "x = 1", "path": "src/a.py"}) == "2 matching lines in 1 file:\nsrc/a.py:1: x = 1\nsrc/a.py:4: x = 1"
    many = search.call(ctx, {"pattern": "x = 1"}).splitlines()  # every match counted, the first 100 shown
    assert many[0] == "152 matching lines in 2 files (the first 100 shown: narrow the pattern, path or glob for the rest):"
    assert len(many) == 101 and many[1:3] == ["src/a.py:1: x = 1", "src/a.py:4: x = 1"] and many[-1] == "src/b.py:98: x = 1"
    (work / "src/b.py").write_text("x = 1\n" * 98)
    assert search.call(ctx, {"pattern": "x = 1"}).splitlines()[0] == "100 matching lines in 2 files:"
    (work / "src/b.py").write_text("y = 25\n")
    assert search.call(ctx, {"pattern": r"y = 2[15]"}) == "2 matching lines in 2 files:\nsrc/a.py:3: y = 21\nsrc/b.py:1: y = 25"
    assert search.call(ctx, {"pattern": r"y = 25"}) == "1 matching line in 1 file:\nsrc/b.py:1: y = 25"
    (work / "src/b.py").unlink()
    assert search.call(ctx, {"pattern": "nothing", "glob": "*.md"}) == \
        "no match for 'nothing' in 1 file (the glob '*.md' matches none of the 1 file under .: all were searched)"
    for t, args in ((read_file, {"path": "../outside.txt"}), (write_file, {"path": "/etc/x", "content": ""})):
        with pytest.raises(ToolError, match="outside the workdir"):
            t.call(ctx, args)
    with pytest.raises(ToolError, match="no file 'nope.py'; the workdir holds: src$"):
        read_file.call(ctx, {"path": "nope.py"})
    with pytest.raises(ToolError, match="no file 'src/nope.py'; src/ holds: a.py"):
        read_file.call(ctx, {"path": "src/nope.py"})
    # a file named without its folder: where it is, rather than an offer to create it
    with pytest.raises(ToolError, match=r"read_file: no file 'a.py'; a file of that name is at src/a.py: give the path from the workdir$"):
        read_file.call(ctx, {"path": "a.py"})
    with pytest.raises(ToolError, match=r"edit_file: no file 'a.py'; a file of that name is at src/a.py: give the path from the workdir$"):
        edit_file.call(ctx, {"path": "a.py", "old": "x", "new": "y"})
    assert write_file.call(ctx, {"path": "lib/a.py", "content": "z = 1\n"}) == \
        "wrote lib/a.py (1 line, 6 bytes); a new file; one of that name is at src/a.py"
    with pytest.raises(ToolError, match=r"no file 'a.py'; a file of that name is at lib/a.py and src/a.py: give"):
        read_file.call(ctx, {"path": "a.py"})
    (work / "lib/a.py").unlink()
    (work / "link").symlink_to("/etc/passwd")  # as sandboxed code could leave it: the host-side tools follow no link out
    for t, args in ((read_file, {"path": "link"}), (write_file, {"path": "link", "content": "x"}), (search, {"pattern": "root", "path": "link"})):
        with pytest.raises(ToolError, match="outside the workdir"):
            t.call(ctx, args)


# --------------------------------------------------------------------------- the loop


def test_python_and_json_files_are_not_broken_by_a_write_or_an_edit(work: Path) -> None:
    ctx = ToolContext(work, None)
    (work / "app.json").write_text('{"server": {"port": 8080}}\n')
    ctx.seen |= {"app.json", "a.py"}  # read before: write_file replaces only a file the run has seen
    # a model that pasted read_file's numbered lines in a fence: refused, the file as it was
    with pytest.raises(ToolError, match=r"write_file: app.json was not changed: the new text is not valid JSON \(Extra data: line 1"):
        write_file.call(ctx, {"path": "app.json", "content": '```\n    1  {"server": 9090}\n```'})
    with pytest.raises(ToolError, match=r"edit_file: app.json was not changed: the new text is not valid JSON"):
        edit_file.call(ctx, {"path": "app.json", "old": "8080", "new": "90 90"})
    assert (work / "app.json").read_text() == '{"server": {"port": 8080}}\n'
    assert edit_file.call(ctx, {"path": "app.json", "old": "8080", "new": "9090"}).startswith("edited app.json at line 1")
    (work / "a.py").write_text("def f():\n    return 1\n")
    with pytest.raises(ToolError, match=r"write_file: a.py was not changed: the new text is not valid Python \(.*line 1\).*write it with bash"):
        write_file.call(ctx, {"path": "a.py", "content": "def f(:\n    return 1\n"})
    with pytest.raises(ToolError, match=r"edit_file: a.py was not changed: the new text is not valid Python \(.*line 2\)"):
        edit_file.call(ctx, {"path": "a.py", "old": "return 1", "new": "return (1"})
    # a file that is broken already may be written in any form (the first step of a fix), other kinds are not checked
    (work / "b.py").write_text("def g(:\n")
    assert edit_file.call(ctx, {"path": "b.py", "old": "def g(:", "new": "def g(x:"}).startswith("edited b.py")
    assert write_file.call(ctx, {"path": "notes.md", "content": "def f(:"}).startswith("wrote notes.md")
    # a new file may hold anything: JSON Lines, a template, nothing yet
    assert write_file.call(ctx, {"path": "rows.json", "content": '{"a": 1}\n{"a": 2}\n'}).startswith("wrote rows.json")
    assert write_file.call(ctx, {"path": "empty.json", "content": ""}).startswith("wrote empty.json")


def test_edit_file_keeps_line_endings_and_mode_and_refuses_what_it_cannot_edit(work: Path) -> None:
    ctx = ToolContext(work, None)
    (work / "w.txt").write_bytes(b"line1\r\nline2\r\nline3\r\n")
    assert edit_file.call(ctx, {"path": "w.txt", "old": "line2\nline3", "new": "LINE2\nline3"}).startswith("edited w.txt at line 2")
    assert (work / "w.txt").read_bytes() == b"line1\r\nLINE2\r\nline3\r\n"
    run = work / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    edit_file.call(ctx, {"path": "run.sh", "old": "hi", "new": "bye"})
    write_file.call(ctx, {"path": "run.sh", "content": "#!/bin/sh\necho bye now\n"})
    assert run.stat().st_mode & 0o777 == 0o755 and run.read_text() == "#!/bin/sh\necho bye now\n"
    (work / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ToolError, match="latin.txt is not UTF-8 text: change it with bash"):
        edit_file.call(ctx, {"path": "latin.txt", "old": "caf", "new": "bar"})
    with pytest.raises(ToolError, match="old is empty: give the exact text to replace"):
        edit_file.call(ctx, {"path": "w.txt", "old": "", "new": "x"})
    assert (work / "latin.txt").read_bytes() == b"caf\xe9\n" and (work / "w.txt").read_bytes() == b"line1\r\nLINE2\r\nline3\r\n"


def test_a_run_plans_acts_finishes_and_is_logged(work: Path, tmp_path: Path) -> None:
    server = FakeServer(scripted([("plan", {"plan": "1. write\n2. finish"}), ("write_file", {"path": "out.txt", "content": "42\n"}),
                                  ("finish", {"answer": "wrote 42"})]))  # fmt: skip
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Write 42 to out.txt")
    server.close()
    assert (res.status, res.answer, res.steps, res.stop_reason) == ("finished", "wrote 42", 3, "finish")
    assert (work / "out.txt").read_text() == "42\n" and not server.errors
    plan = {"type": "function", "function": {"name": "plan"}}
    assert [r["tool_choice"] for r in server.requests] == [plan, "required", "required"]  # the plan step first
    assert all(r["parallel_tool_calls"] is False for r in server.requests)
    offered = [[t["function"]["name"] for t in r["tools"]] for r in server.requests]
    assert offered[0][-2:] == ["plan", "finish"] and "plan" not in offered[1] and offered[1] == offered[2]  # plan only when asked
    # the plan sits right after the task; the system prompt and task never change (a stable, cached prefix)
    last = server.requests[-1]["messages"]
    assert [m["role"] for m in last[:3]] == ["system", "user", "user"] and last[2]["content"].startswith("Your current plan:\n1. write")
    assert res.prompt_tokens == sum(tokens(r["messages"]) for r in server.requests) and res.cached_tokens > 0
    # a longkv server keeps every tool in the prompt (a stable prefix) and narrows the calls with allowed_tools
    kv = FakeServer(scripted([("plan", {"plan": "1. write"}), ("write_file", {"path": "o2.txt", "content": "1"}), ("finish", {"answer": "ok"})]), longkv=True)
    with _agent(kv, work, tmp_path) as agent:
        assert agent.run("Write 1 to o2.txt").status == "finished"
    kv.close()
    assert all(r["tools"] == kv.requests[0]["tools"] for r in kv.requests) and "plan" in [t["function"]["name"] for t in kv.requests[0]["tools"]]
    # recall stays closed while no result but the newest (in view whole) could be recalled: here the plan's and the write's
    acts = [t["function"]["name"] for t in kv.requests[0]["tools"] if t["function"]["name"] not in ("plan", "recall")]
    assert "recall" in [t["function"]["name"] for t in kv.requests[0]["tools"]]
    assert [r["tool_choice"] for r in kv.requests] == [plan] + [{"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": n}} for n in acts]}}] * 2  # fmt: skip
    log = RunLog(tmp_path / "runs")
    events = log.events(res.run)
    assert [e.kind for e in events] == ["start", "request", "reply", "tool_start", "tool_result", "request", "reply", "tool_start",
                                        "tool_result", "request", "reply", "tool_start", "tool_result", "end"]  # fmt: skip
    s = summary(log.info(res.run), events)
    assert (s["status"], s["steps"], s["prompt_tokens"], s["cached_tokens"]) == ("finished", 3, res.prompt_tokens, res.cached_tokens)
    assert RunState.replay(events).plan == "1. write\n2. finish"


def test_invalid_replies_get_specific_corrections(work: Path, tmp_path: Path) -> None:
    replies = iter([
        {"calls": [("no_such_tool", {})]},
        {"calls": [("read_file", "{not json")]},
        {"content": '{"name": "read_file", "arguments": {"path": "a"}}'},
        {"content": "The answer is 7."},
    ])  # fmt: skip
    server = FakeServer(lambda msgs: next(replies))
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("What is 3 + 4?")
    server.close()
    assert (res.status, res.answer, res.stop_reason) == ("finished", "The answer is 7.", "answered")
    msgs = server.requests[-1]["messages"]
    results = tool_results(msgs)
    assert results[0].startswith("error: there is no tool 'no_such_tool': the tools are bash, python, read_file")
    assert results[1].startswith("error: the arguments are not valid JSON (Expecting property name")
    assert msgs[-1] == {"role": "user", "content": "Your reply was not a valid tool call: it was sent as text. Call a tool through "
                                                   "the tools interface, with JSON arguments that match its parameters."}  # fmt: skip


def test_a_loop_is_dropped_hinted_and_replanned(work: Path, tmp_path: Path) -> None:
    (work / "a.txt").write_text("same\n")

    def script(msgs: list[dict]) -> dict:
        if any("Repeating it will not help" in (m.get("content") or "") for m in msgs):
            return {"calls": [("finish", {"answer": "gave up looping"})]}
        return {"calls": [("read_file", {"path": "a.txt"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Read a.txt")
    server.close()
    assert (res.status, res.answer) == ("finished", "gave up looping")
    after = server.requests[3]  # the request after the third identical call
    assert after["tool_choice"] == {"type": "function", "function": {"name": "plan"}} and after["temperature"] == 0.7
    # two of the three repeats left the context; the hint is the last message
    assert len(tool_results(after["messages"])) == 1
    assert after["messages"][-1]["content"].startswith('You called read_file({"path": "a.txt"}) three times with the same result.')
    assert server.requests[-1]["temperature"] == 0.7 and not server.errors


def test_find_loop_knows_one_call_three_times_and_rounds_of_two_or_three_calls_made_twice() -> None:
    ok = lambda sig, out: (sig, out, False)  # noqa: E731
    err = lambda sig, out: (sig, out, True)  # noqa: E731
    a, b, c = ok("read(a)", "A"), ok("read(b)", "B"), err("sed(x)", "unterminated")
    assert find_loop([a, a, a]) == (1, 3) and find_loop([a, a]) is None
    assert find_loop([err("edit(1)", "E"), err("edit(2)", "E"), err("edit(3)", "E")]) == (1, 3)  # the same error, other calls
    assert find_loop([ok("edit(1)", "E"), ok("edit(2)", "E"), ok("edit(3)", "E")]) is None  # other calls, results alike
    assert find_loop([c, a, b, a, b]) == (2, 2) and find_loop([a, b, a, c]) is None
    edits = [err("edit(same)", "same text"), err("write(result 16)", "not Python"), c,
             err("edit(same)", "same text"), err("write(result 19)", "not Python"), c]  # a 1.5B run's round of three
    assert find_loop(edits) == (3, 2) and find_loop(edits[:-1]) is None
    assert find_loop([a, a, b, a, a, b]) is None  # not a round of three distinct outcomes (nor a call three times)


def test_spread_error_knows_the_same_error_three_times_with_other_calls_between() -> None:
    label = lambda n: (f'write_file({{"content": "result {n}"}})', "label", True)  # noqa: E731
    recall = lambda n: (f'recall("result {n}")', f"R{n}", False)  # noqa: E731
    run = [label(3), recall(3), label(5), recall(5), label(7)]  # a 1.5B run alternated these until its step cap
    assert find_loop(run) is None and spread_error(run) == 4  # the first of the three errors was 4 calls ago
    assert spread_error(run[:-1]) is None and spread_error(run[:3]) is None  # the latest call is no error / only two errors
    assert spread_error([label(1), *[recall(i) for i in range(5)], label(2), label(3)]) is None  # the first is 7 calls back


def test_a_round_of_failing_calls_made_twice_is_recovered(work: Path, tmp_path: Path) -> None:
    """Three different failing calls, made in the same order again, are a loop: the second round leaves the
    context, the hint names the round, the next request is hot and asks for a new plan."""
    (work / "a.py").write_text("x = 1\n")
    calls = itertools.cycle([("edit_file", {"path": "a.py", "old": "x = 1", "new": "x = 1"}),
                             ("write_file", {"path": "a.py", "content": "result 3"}),
                             ("bash", {"command": "sed -i 's/x/"})])  # fmt: skip

    def script(msgs: list[dict]) -> dict:
        if any("went round the same 3 calls twice" in (m.get("content") or "") for m in msgs):
            return {"calls": [("finish", {"answer": "stopped going round"})]}
        return {"calls": [next(calls)]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Fix a.py")
    server.close()
    assert (res.status, res.answer, res.steps) == ("finished", "stopped going round", 7)
    after = server.requests[6]
    assert after["temperature"] == 0.7 and len(tool_results(after["messages"])) == 3  # the first round stays
    assert after["messages"][-1]["content"].startswith('You went round the same 3 calls twice (edit_file({"new": "x = 1", "old"')
    assert (work / "a.py").read_text() == "x = 1\n"


def test_the_same_error_three_times_between_other_calls_is_recovered(work: Path, tmp_path: Path) -> None:
    """A refused label write alternated with other calls (each of them new) is a loop too: after the third refusal
    the calls since the first leave the context and the hint says so."""
    (work / "a.py").write_text("x = 1\n")
    label = ("write_file", {"path": "a.py", "content": "result 1"})
    calls = iter([label, ("search", {"pattern": "x"}), label, ("search", {"pattern": "y"}), label])

    def script(msgs: list[dict]) -> dict:
        if any("got the same error three times, with other calls between" in (m.get("content") or "") for m in msgs):
            return {"calls": [("finish", {"answer": "stopped"})]}
        return {"calls": [next(calls)]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Fix a.py")
    server.close()
    assert (res.status, res.answer, res.steps) == ("finished", "stopped", 6)
    after = server.requests[5]
    assert after["temperature"] == 0.7 and len(tool_results(after["messages"])) == 1  # the first refusal stays
    assert (work / "a.py").read_text() == "x = 1\n"


def test_a_call_that_only_repeats_the_last_one_is_not_run_and_its_tool_sits_out_a_step(work: Path, tmp_path: Path) -> None:
    """A call equal to the one just before, or to the one before that when neither it nor the call between
    changed a file, is not run again. Against a longkv server the call leaves the context and the same step is
    asked again with that tool closed (allowed_tools); elsewhere its result says which result it repeats. Once a
    file was written between them, the same call runs again."""
    (work / "a.txt").write_text("alpha\n")
    read, edit = ("read_file", {"path": "a.txt"}), ("edit_file", {"path": "a.txt", "old": "alpha", "new": "alpha alpha"})
    calls = [("plan", {"plan": "1. read\n2. edit"}), read, read, ("search", {"pattern": "alpha"}), read, edit, read,
             ("write_file", {"path": "b.txt", "content": "b\n"}), read, ("finish", {"answer": "done"})]  # fmt: skip
    made = iter(calls)  # one call per request, in order (the step after a call not run sees the same messages)
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, longkv=True)
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Double the word in a.txt")
    server.close()
    assert (res.status, res.steps, server.errors) == ("finished", 10, [])
    assert (work / "a.txt").read_text() == "alpha alpha\n"
    results = tool_results(server.requests[-1]["messages"])  # [result 2] on (the plan's result is not in the context)
    assert [r.splitlines()[0] for r in results] == ["[result 2]", "[result 4]", "[result 6]", "[result 7]", "[result 8]", "[result 9]"]
    assert results[3] == results[5].replace("[result 9]", "[result 7]") == "[result 7]\n    1  alpha alpha"  # b.txt written between
    assert not any("not run" in json.dumps(r["messages"]) for r in server.requests)
    # the step after a call not run is asked with the same messages as the step that made it
    assert [server.requests[i]["messages"] for i in (3, 5)] == [server.requests[i]["messages"] for i in (2, 4)]

    def offered(r: dict) -> list[str]:
        return [t["function"]["name"] for t in r["tool_choice"]["allowed_tools"]["tools"]]

    every = [t["function"]["name"] for t in server.requests[0]["tools"]]
    # request 2: nothing to recall yet; 4: read_file sits out after its repeat; 5: back; 6: out again
    assert offered(server.requests[1]) == [n for n in every if n not in ("plan", "recall")]
    assert offered(server.requests[3]) == [n for n in every if n not in ("plan", "read_file")]
    assert offered(server.requests[4]) == [n for n in every if n != "plan"]
    assert offered(server.requests[5]) == [n for n in every if n not in ("plan", "read_file")]
    log = RunLog(tmp_path / "runs")
    events = log.events(res.run)
    st = RunState.replay(events)
    log.close()
    assert (st.repeats, st.wrote, st.barred) == ({3: 2, 5: 2}, {6, 8}, set())
    note = "and no file has changed since: it would only repeat that result. Use that result: call another tool, or finish with your answer."
    kept = [e.data["output"] for e in events if e.kind == "tool_result" and e.data.get("repeat")]
    assert kept == [f"not run: this is the same call as result {k}, {note}" for k in (2, 2)]  # the log keeps the notes

    # another server cannot close a tool: the note stays in the context
    (work / "a.txt").write_text("alpha\n")
    other = FakeServer(scripted([read, read, ("finish", {"answer": "done"})]))
    with _agent(other, work, tmp_path, plan=False) as agent:
        agent.run("Read a.txt")
    other.close()
    assert tool_results(other.requests[-1]["messages"])[1] == f"not run: this is the same call as an earlier call, {note}"


def test_a_shell_command_sent_to_python_after_bash_ran_it_is_that_repeat(work: Path, tmp_path: Path) -> None:
    """The same command line sent to the python tool right after bash ran it is the bash call's repeat (not run,
    its result named), not a hint to run it with bash, which the step may have closed; sent first, it gets the hint."""
    (work / "a.txt").write_text("alpha\n")
    cat = {"command": "cat a.txt"}
    server = FakeServer(scripted([("bash", cat), ("python", {"code": "cat a.txt"}), ("python", {"code": "grep alpha a.txt"}),
                                  ("finish", {"answer": "alpha"})]))  # fmt: skip
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Print a.txt")
    server.close()
    assert res.status == "finished"
    results = tool_results(server.requests[-1]["messages"])
    assert "alpha" in results[0]
    assert results[1].startswith("not run: this is the same call as an earlier call, and no file has changed since")
    assert results[2] == "error: python: 'grep alpha a.txt' is a shell command, not Python: run it with the bash tool"


def test_a_change_repeated_word_for_word_is_not_made_twice_and_the_run_is_asked_to_finish(work: Path, tmp_path: Path) -> None:
    """An edit (or any call that changed a file) made again with nothing changed since is not run: its result
    says the change is made, and the next request asks for finish (the run stops with the model's answer).
    A call that changed nothing is only barred for a step (the test above)."""
    (work / "a.txt").write_text("alpha\n")
    edit = ("edit_file", {"path": "a.txt", "old": "alpha", "new": "beta"})
    made = iter([edit, edit, ("finish", {"answer": "alpha is beta now"})])
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, longkv=True)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Change alpha to beta in a.txt")
    server.close()
    assert (res.status, res.answer, res.steps, res.stop_reason) == ("stopped", "alpha is beta now", 3, "The model repeated a change it had made")
    assert (work / "a.txt").read_text() == "beta\n"
    assert [r["tool_choice"] == {"type": "function", "function": {"name": "finish"}} for r in server.requests] == [False, False, True]
    last = server.requests[-1]["messages"]  # the repeat left the context (the model would copy its note): the change's result is the last
    assert tool_results(last)[-1].startswith("[result 1]\nedited a.txt at line 1 (1 line -> 1 line)")
    assert last[-1] == {"role": "user", "content": "That change is made. Call finish now with what you changed."}
    log = RunLog(tmp_path / "runs")
    outputs = [e.data["output"] for e in log.events(res.run) if e.kind == "tool_result"]
    log.close()
    assert outputs[1] == "not run: this is the same call as result 1, which made its change; no file has changed since."  # the log keeps it


def test_a_command_repeated_that_only_made_new_files_is_a_plain_repeat_not_a_finished_change(work: Path, tmp_path: Path) -> None:
    """A test run sent to a new file (``python t.py > out.txt``) and repeated is barred for a step like a call that
    changed nothing; the run is not asked to finish (the 0.5B model had fixed nothing yet). A bash command that
    changed a file that was there (``sed -i``) and is repeated asks for finish."""
    (work / "t.py").write_text("print('ok')\n")
    (work / "a.txt").write_text("alpha\n")
    run_test = ("bash", {"command": "python t.py > out.txt"})
    sed = ("bash", {"command": "sed -i s/alpha/beta/ a.txt"})
    made = iter([run_test, run_test, sed, sed, ("finish", {"answer": "beta"})])
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, longkv=True)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Run t.py, then change alpha to beta in a.txt")
    server.close()
    assert (res.status, res.answer, res.stop_reason) == ("stopped", "beta", "The model repeated a change it had made")
    assert ((work / "out.txt").read_text(), (work / "a.txt").read_text()) == ("ok\n", "beta\n")
    log = RunLog(tmp_path / "runs")
    outputs = [e.data["output"] for e in log.events(res.run) if e.kind == "tool_result"]
    log.close()
    assert outputs[1].startswith("not run: this is the same call as result 1, and no file has changed since")
    assert outputs[3] == "not run: this is the same call as result 3, which made its change; no file has changed since."
    finish = {"type": "function", "function": {"name": "finish"}}
    assert [r["tool_choice"] == finish for r in server.requests] == [False, False, False, False, True]


def test_a_command_that_rewrote_a_file_with_the_same_bytes_made_no_change(work: Path, tmp_path: Path) -> None:
    """``python t.py > out.txt`` run again rewrites out.txt with the same bytes: no change, so repeating it once more
    is a plain repeat (barred for a step), not "a change already made" that ends the run."""
    (work / "t.py").write_text("print('ok')\n")
    run_test = ("bash", {"command": "python t.py > out.txt"})
    made = iter([run_test, ("bash", {"command": "ls"}), run_test, run_test, ("finish", {"answer": "ok"})])
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, longkv=True)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Run t.py")
    server.close()
    assert (res.status, res.answer, res.stop_reason) == ("finished", "ok", "finish")
    log = RunLog(tmp_path / "runs")
    results = [e.data for e in log.events(res.run) if e.kind == "tool_result"]
    log.close()
    assert [r["edited"] for r in results if "edited" in r] == [0, 0, 0, 0]
    assert results[3]["output"].startswith("not run: this is the same call as result 3, and no file has changed since")


def test_a_fifo_in_the_workdir_does_not_hang_a_snapshot(work: Path) -> None:
    os.mkfifo(work / "pipe")
    (work / "a.txt").write_text("alpha\n")
    assert set(snapshot(work, digests=True)) == {"a.txt"}  # reading the FIFO would block until a writer came


def test_the_file_tools_refuse_a_fifo(work: Path) -> None:
    os.mkfifo(work / "pipe")
    ctx = ToolContext(work, None)
    for t, args in ((read_file, {"path": "pipe"}), (write_file, {"path": "pipe", "content": "x"}), (edit_file, {"path": "pipe", "old": "a", "new": "b"})):
        with pytest.raises(ToolError, match=r"^'pipe' is a named pipe \(FIFO\), not a file: the file tools read and write regular files only$"):
            t.call(ctx, args)
    assert (work / "pipe").is_fifo()  # not replaced by a regular file


def test_the_root_of_the_file_system_is_no_workdir(tmp_path: Path) -> None:
    with pytest.raises(LongKVError, match="is the root of the file system: the tools would write anywhere; pass a project folder"):
        Agent(server="http://127.0.0.1:9/v1", workdir="/", runs_dir=tmp_path / "runs")


def test_agent_show_names_what_became_of_each_call(work: Path, tmp_path: Path) -> None:
    """agent show's rows: a bash call's exit code read from the runtime's exit line even when a hint follows it, a
    call not run as the repeat of its result, a user's resume message marked as one, and long notes cut with a
    mark instead of mid-sentence. A repeat names the step of the call it repeats, also where an earlier step made no call."""
    made = iter([None, ("bash", {"command": "nano a.txt"}), ("bash", {"command": "nano a.txt"}), ("finish", {"answer": "done"})])
    server = FakeServer(lambda msgs: {"calls": [c]} if (c := next(made)) else {"content": ""}, longkv=True)  # step 1: no call
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Edit a.txt")
    server.close()
    log = RunLog(tmp_path / "runs")
    rows = [r for r in steps(log.events(res.run)) if "step" in r]
    assert [c["status"] for r in rows for c in r["calls"]] == ["exit 127", "not run: repeats step 2", "ok"]  # result 1 is step 2's
    log.append(res.run, "note", {"content": "Use edit_file. " + "x" * 400, "source": "user"})
    notes = [r["note"] for r in steps(log.events(res.run)) if "note" in r]
    assert notes[-1].startswith("message: Use edit_file.")
    buf = io.StringIO()
    render(log, res.run, False, None, Console(file=buf, width=200))
    log.close()
    shown = buf.getvalue()
    assert "bash (exit 127)" in shown and "bash (not run: repeats step 2)" in shown
    flat = "".join(shown.split())  # the note folds over several lines of the table
    assert "x" * 275 + "…" in flat and "x" * 276 not in flat


def test_tools_that_only_repeated_stay_closed_until_a_call_runs(work: Path, tmp_path: Path) -> None:
    """A model that alternates two repeats (read, search, read again, search again) meets both tools closed
    together against a longkv server; a call that runs opens them again."""
    (work / "a.txt").write_text("alpha\n")
    read, find = ("read_file", {"path": "a.txt"}), ("search", {"pattern": "alpha"})
    made = iter([read, find, read, find, ("bash", {"command": "true"}), ("finish", {"answer": "done"})])
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, longkv=True)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Read a.txt")
    server.close()
    assert res.status == "finished"

    def closed(r: dict) -> set[str]:
        every = {t["function"]["name"] for t in r["tools"]}
        return every - {t["function"]["name"] for t in r["tool_choice"]["allowed_tools"]["tools"]} if isinstance(r["tool_choice"], dict) else set()

    assert [closed(r) - {"recall"} for r in server.requests] == [set(), set(), set(), {"read_file"}, {"read_file", "search"}, set()]


def test_without_plan_the_run_goes_straight_to_the_tools(work: Path, tmp_path: Path) -> None:
    """plan=False (--no-plan): no plan tool, no plan step, a system prompt that asks for none, and a loop's hint
    asks for another approach without a re-plan; a resumed run keeps the choice."""
    (work / "a.txt").write_text("x\n")
    def script(msgs: list[dict]) -> dict:
        if any("Repeating it will not help" in (m.get("content") or "") for m in msgs):
            return {"calls": [("finish", {"answer": "x"})]}
        return {"calls": [("search", {"pattern": "x"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, plan=False) as agent:
        assert "plan" not in agent.toolbox
        res = agent.run("Find x")
    server.close()
    assert (res.status, res.answer, res.steps) == ("finished", "x", 4)
    assert [r["tool_choice"] for r in server.requests] == ["required"] * 4
    assert all("plan" not in [t["function"]["name"] for t in r["tools"]] for r in server.requests)
    system = server.requests[0]["messages"][0]["content"]
    assert "plan" not in system and "Work step by step with the tools (bash" in system
    hint = next(m["content"] for m in server.requests[-1]["messages"] if m["role"] == "user" and "three times" in m["content"])
    assert hint.endswith("Repeating it will not help. Step back: try a different approach (another tool, other arguments, or check your assumptions).")
    log = RunLog(tmp_path / "runs")
    assert RunState.replay(log.events(res.run)).options["plan"] is False
    log.close()


def test_a_plan_that_is_not_a_list_of_steps_is_not_kept_and_the_run_goes_on_without_one(work: Path, tmp_path: Path) -> None:
    """A plan call whose text lists no steps (a paragraph: the task in other words) leaves the context with its
    refusal, no plan is asked for again (not after a loop either), and the loop hint asks for another approach."""
    (work / "a.txt").write_text("x\n")
    planned: list[int] = []

    def script(msgs: list[dict]) -> dict:
        if any("Repeating it will not help" in (m.get("content") or "") for m in msgs):
            return {"calls": [("finish", {"answer": "x"})]}
        if msgs[-1]["role"] == "user" and msgs[-1]["content"].startswith("Find x") and not planned:
            planned.append(1)
            return {"calls": [("plan", {"plan": "Find x in the files and say where it is."})]}
        return {"calls": [("search", {"pattern": "x"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Find x")
    server.close()
    assert (res.status, res.answer) == ("finished", "x")
    plan = {"type": "function", "function": {"name": "plan"}}
    assert [r["tool_choice"] for r in server.requests] == [plan] + ["required"] * (len(server.requests) - 1)
    second = server.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user"]  # the refused plan call left the context, no plan shown
    hint = server.requests[-1]["messages"][-1]["content"]
    assert hint.endswith("Repeating it will not help. Step back: try a different approach (another tool, other arguments, or check your assumptions).")
    log = RunLog(tmp_path / "runs")
    refused = next(e.data for e in log.events(res.run) if e.kind == "tool_result")
    st = RunState.replay(log.events(res.run))
    log.close()
    assert refused["output"] == "not kept: a plan is a numbered list of steps. Go on with the other tools, one call at a time."
    assert st.planless and st.plan == ""


def test_is_step_list_wants_a_numbered_or_bulleted_line() -> None:
    assert is_step_list("1. read a.txt\n2. fix it") and is_step_list("1) a\n 2) b") and is_step_list("- a\n- b") and is_step_list("1.Open\n2.Close")
    assert is_step_list("1. one step") and is_step_list("First:\n  1. read")
    assert not is_step_list("Rename the function and update every caller.") and not is_step_list("add_tag('a') 2. add_tag('b')")
    assert not is_step_list("1.5 is a number\n2.0 too")


def test_the_plan_comes_first_and_an_unasked_plan_call_is_answered_with_act(work: Path, tmp_path: Path) -> None:
    replies = iter([{"calls": [("plan", {"plan": "1. look"})]}, {"calls": [("plan", {"plan": "1. look again"})]},
                    {"calls": [("finish", {"answer": "ok"})]}])  # fmt: skip
    server = FakeServer(lambda msgs: next(replies))
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Look around")
    server.close()
    assert res.status == "finished" and tool_results(server.requests[-1]["messages"]) == [
        "error: the plan is set (it is at the top of your context): carry out its next step with another tool. "
        "You will be asked to rewrite the plan if the work gets stuck",
    ]
    assert server.requests[-1]["messages"][2]["content"] == f"Your current plan:\n1. look\n{PLAN_NEXT}"  # unchanged
    # the accepted plan call is folded into the front; the refused one stays, with its correction
    assert [m.get("tool_calls", [{}])[0].get("function", {}).get("name") for m in server.requests[-1]["messages"] if m["role"] == "assistant"] == ["plan"]


def test_the_step_cap_ends_with_a_best_effort_answer(work: Path, tmp_path: Path) -> None:
    def script(msgs: list[dict]) -> dict:
        if "Call finish now" in (msgs[-1].get("content") or ""):
            return {"calls": [("finish", {"answer": "partial: 2 of 3 files checked"})]}
        return {"calls": [("bash" if SANDBOX else "search", {"command": f"echo {len(msgs)}"} if SANDBOX else {"pattern": str(len(msgs))})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, max_steps=3) as agent:
        res = agent.run("Check the files")
    server.close()
    assert (res.status, res.answer, res.steps) == ("stopped", "partial: 2 of 3 files checked", 4)
    assert res.stop_reason == "The step limit (3 model calls) is reached"
    assert server.requests[-1]["tool_choice"] == {"type": "function", "function": {"name": "finish"}}


def test_three_empty_replies_stop_the_run(work: Path, tmp_path: Path) -> None:
    server = FakeServer(lambda msgs: {"content": "  "})
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Do something")
    server.close()
    assert (res.status, res.steps, res.stop_reason) == ("stopped", 4, "Three replies in a row held no tool call (empty, or cut off at the token limit)")
    assert tool_results(server.requests[-1]["messages"]) == []


def test_a_final_answer_cut_off_at_the_token_limit_is_kept_as_far_as_it_got(work: Path, tmp_path: Path) -> None:
    """At the step cap the model is asked to finish; when that finish call runs to max_tokens, the run's answer is
    the start of its answer string, marked as cut."""
    raw = '{"name": "finish", "arguments": {"answer": "15 lines have ERROR, caf\\u00e9 and more more more'

    def script(msgs: list[dict[str, Any]]) -> dict[str, Any]:
        if "step limit" in (msgs[-1].get("content") or ""):
            return {"cut": ("finish", raw)}
        return {"calls": [("bash", {"command": "echo hi"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, max_steps=2) as agent:
        res = agent.run("Count the errors")
    server.close()
    assert (res.status, res.answer) == ("stopped", "15 lines have ERROR, café and more more more [cut off at the token limit]")
    assert partial_string('{"answer": "done", "extra', "answer") == "done" and partial_string('{"answer": "a\\', "answer") == "a"
    assert partial_string('{"answer": "two\nlines', "answer") == "two\nlines" and partial_string('{"name": "finish", "argu', "answer") is None
    assert partial_string('{"plan": "1. read\\n2. wri', "plan") == "1. read\n2. wri"


def test_a_plan_cut_off_at_the_token_limit_is_named_kept_and_counted(work: Path, tmp_path: Path) -> None:
    """Replies cut off inside a plan call with no whole line: the model hears that its plan is not kept, it is not
    asked for a plan again (a greedy model would write the same one), the run log keeps what it wrote, agent show
    prints it, and the run stops for replies with no call, not for empty ones."""
    raw = '{"name": "plan", "arguments": {"plan": "1. read the file 2. read it again 3.'
    server = FakeServer(lambda msgs: {"cut": ("plan", raw)})
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Do something")
    server.close()
    assert (res.status, res.steps, res.stop_reason) == ("stopped", 4, "Three replies in a row held no tool call (empty, or cut off at the token limit)")
    notes = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "user" and "cut off" in (m["content"] or "")]
    assert notes[0] == ("Your plan was cut off at the token limit (512 tokens) and is not kept: go on without a plan, with the "
                        "other tools, one call at a time.")
    plan = {"type": "function", "function": {"name": "plan"}}
    assert [r["tool_choice"] for r in server.requests][:3] == [plan, "required", "required"]
    log = RunLog(tmp_path / "runs")
    rows = steps(log.events(res.run))
    assert rows[0]["truncated"] == {"name": "plan", "text": raw}
    buf = io.StringIO()
    render(log, res.run, False, 1, Console(file=buf, width=200))
    assert "plan, cut off at the token limit" in buf.getvalue() and "read it again" in buf.getvalue()


def test_a_plan_cut_off_keeps_its_whole_lines(work: Path, tmp_path: Path) -> None:
    """A plan cut off after two whole lines: those lines become the plan at the top of the context (the cut third
    line is not kept), the run goes on with the tools, and its state rebuilt from the log has the same plan."""
    raw = '{"plan": "1. read a.txt\\n2. fix it\\n3. run the te'

    def script(msgs: list[dict]) -> dict:
        if not any("Your current plan" in (m.get("content") or "") for m in msgs):
            return {"cut": ("plan", raw)}
        return {"calls": [("finish", {"answer": "done"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Fix a.txt")
    server.close()
    assert (res.status, res.answer, len(server.requests)) == ("finished", "done", 2)
    front = server.requests[1]["messages"][2]["content"]
    assert front.startswith("Your current plan:\n1. read a.txt\n2. fix it\n") and "run the te" not in front
    note = server.requests[1]["messages"][-1]["content"]
    assert note.startswith("Your plan was cut off at the token limit (512 tokens); its first 2 lines are kept as your plan")
    assert RunState.replay(RunLog(tmp_path / "runs").events(res.run)).plan == "1. read a.txt\n2. fix it"


def test_huge_tool_outputs_never_overflow_the_window(work: Path, tmp_path: Path) -> None:
    """Tool results of 50-200 K characters on a 2 K-token window: each goes back cut (head + tail), old steps leave
    the context whole (calls with their results), no request overflows, and the run finishes."""
    sizes = [50_000, 120_000, 200_000, 80_000, 150_000, 60_000, 90_000, 200_000, 70_000, 100_000, 130_000, 55_000]
    for i, n in enumerate(sizes):
        (work / f"big{i}.txt").write_text("".join(f"line {j} " + "x" * 40 + "\n" for j in range(n // 48)))
    calls = [("bash", {"command": f"cat big{i}.txt"}) for i in range(len(sizes))] + [("finish", {"answer": "read them all"})]
    made = iter(calls)  # one call per request, whatever the context still shows
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, window=2048)
    with _agent(server, work, tmp_path, reply_tokens=256) as agent:
        res = agent.run("Read the big files")
    server.close()
    assert (res.status, res.answer, server.errors) == ("finished", "read them all", [])
    assert all(tokens(r["messages"]) + 256 <= 2048 for r in server.requests)
    results = tool_results(server.requests[-1]["messages"])
    assert "characters cut: the whole output is in the run log" in results[-1]
    assert any("Earlier steps are not shown here" in (m.get("content") or "") for m in server.requests[-1]["messages"])
    log = RunLog(tmp_path / "runs")
    whole = [e.data["output"] for e in log.events(res.run) if e.kind == "tool_result" and e.data["name"] == "bash"]
    assert [len(w.splitlines()) for w in whole] == [n // 48 + 1 for n in sizes]  # the log keeps every line (+ exit code)


def test_kv_memory_compresses_tool_results_only_once_the_prompt_fills_half_the_window(work: Path, tmp_path: Path) -> None:
    """A result's compression costs a forward over its tokens: while the prompt fills less than half of what the
    window leaves for it, every request asks the server to keep tool results whole (tool_keep null); past that,
    at 0.5."""
    (work / "small.txt").write_text("a few words\n")
    (work / "big.txt").write_text("".join(f"line {j} " + "x" * 40 + "\n" for j in range(200)))  # ~10 K characters
    calls = [("read_file", {"path": "small.txt"}), *[("bash", {"command": f"cat big.txt # {i}"}) for i in range(10)], ("finish", {"answer": "read"})]
    made = iter(calls)
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, window=8192, longkv=True)
    with _agent(server, work, tmp_path, reply_tokens=256, plan=False) as agent:
        res = agent.run("Read the files")
    server.close()
    assert (res.status, server.errors) == ("finished", [])
    counted = [tokens(r["messages"]) for r in server.requests]  # what the server counted, one prompt after another
    half = (8192 - 256) // 2
    assert counted[0] < half < counted[-2]  # the big outputs fill the window as the run goes
    assert [r["longkv"]["memory"]["tool_keep"] for r in server.requests] == [None] + [0.5 if c > half else None for c in counted[:-1]]


def test_the_plan_and_the_final_answer_are_asked_with_the_loop_guard_on_other_calls_without(work: Path, tmp_path: Path) -> None:
    """A longkv server gets DRY (ask's 0.8) on the requests that ask for prose, the plan and the final answer after a
    cap, and not on a tool call that may copy text (an edit's old into its new); other servers get no longkv object."""
    plan = ("plan", {"plan": "1. look\n2. answer"})
    for longkv in (True, False):
        made = iter([plan, *[("bash", {"command": f"echo {i}"}) for i in range(3)], ("finish", {"answer": "seen"})])
        server = FakeServer(lambda msgs, made=made: {"calls": [next(made)]}, window=8192, longkv=longkv)
        with _agent(server, work, tmp_path, max_steps=4, kv_memory=False) as agent:
            res = agent.run("Look around")
        server.close()
        assert (res.status, res.stop_reason, server.errors) == ("stopped", "The step limit (4 model calls) is reached", [])
        guards = [(r.get("longkv") or {}).get("dry_multiplier") for r in server.requests]
        assert guards == ([0.8, None, None, None, 0.8] if longkv else [None] * 5)
        assert [r["tool_choice"] for r in server.requests][::4] == [{"type": "function", "function": {"name": n}} for n in ("plan", "finish")]


def test_a_longkv_server_gets_the_run_as_a_kv_memory_session(work: Path, tmp_path: Path) -> None:
    """Against longkv serve the run's requests name its KV memory session; the history sent may pass the window
    (the server fits its KV) up to 4 windows, then turns are dropped, leaving no marker message behind (the session
    cuts them out of its KV only when nothing takes their place). Other servers get neither."""
    sizes = [60_000, 90_000, 70_000, 80_000, 65_000] * 10
    for i, n in enumerate(sizes):
        (work / f"big{i}.txt").write_text("".join(f"line {j} " + "x" * 40 + "\n" for j in range(n // 48)))
    calls = [("bash", {"command": f"cat big{i}.txt"}) for i in range(len(sizes))] + [("finish", {"answer": "done"})]
    made = iter(calls)
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, window=2048, longkv=True)
    with _agent(server, work, tmp_path, reply_tokens=256, max_steps=60) as agent:
        assert agent.kv_memory
        res = agent.run("Read the big files")
    server.close()
    assert (res.status, server.errors) == ("finished", []), res.stop_reason
    # results are compressed once the last prompt the server counted passed half of what the window leaves
    counted = [tokens(r["messages"]) for r in server.requests]
    keeps = [None] + [0.5 if c > (2048 - 256) // 2 else None for c in counted[:-1]]
    assert keeps.count(0.5) > len(keeps) // 2
    # the requests that ask for the plan (this script answers them with other calls) have the loop guard on
    guard = [{"dry_multiplier": 0.8} if r["tool_choice"] == {"type": "function", "function": {"name": "plan"}} else {} for r in server.requests]
    assert guard[0]
    assert [r["longkv"] for r in server.requests] == [
        {"session": res.run, "memory": {"save": False, "tool_keep": k}, **g} for k, g in zip(keeps, guard, strict=True)]
    reqs = server.requests
    assert any(len(b["messages"]) < len(a["messages"]) for a, b in itertools.pairwise(reqs))  # turns were dropped ...
    assert 2048 < max(tokens(r["messages"]) for r in reqs) <= 4 * 2048  # ... once the text held 4 windows
    log = RunLog(tmp_path / "runs")
    rows = [r for r in steps(log.events(res.run)) if "step" in r]
    assert [r["kv"] for r in rows] == [min(tokens(q["messages"]) // 2, 2047) for q in reqs] and rows[0]["edits"] == {"compress": 1}
    out = io.StringIO()
    render(log, res.run, False, None, Console(file=out, width=200))
    assert "KV edits" in out.getvalue() and f"{rows[5]['kv']} " in out.getvalue() and "compress 1" in out.getvalue()
    narrow = io.StringIO()  # 80 columns: fewer columns, none cut short, every call named whole
    render(log, res.run, False, None, Console(file=narrow, width=80))
    head = next(line for line in narrow.getvalue().splitlines() if "step" in line)
    assert head.split() == ["step", "prompt", "cached", "model", "s", "KV", "KV", "edits", "calls"] and "…" not in narrow.getvalue()
    assert narrow.getvalue().count("bash (exit 0)") == len(sizes) and "KV edits: what the server did" in narrow.getvalue()
    log.close()
    assert not any("Earlier steps are not shown here" in (m.get("content") or "") for r in server.requests for m in r["messages"])
    plain = FakeServer(lambda msgs: {"content": "ok"})
    with _agent(plain, work, tmp_path) as agent:
        assert not agent.kv_memory
        agent.run("Say ok")
    with pytest.raises(LongKVError, match="is not longkv serve: KV memory needs it"):
        _agent(plain, work, tmp_path, kv_memory=True)
    plain.close()
    assert all("longkv" not in r for r in plain.requests)


def test_recall_puts_an_earlier_result_back_whole_after_its_turn_left_the_context(work: Path, tmp_path: Path) -> None:
    """With KV memory every tool result is numbered ([result N]); recall answers with a result's exact context
    text, found by its call or words or by its number, also once its turn has left a small window; a bad number
    or words no result holds are tool errors that say what to send.
    Without KV memory there is no numbering and no recall tool (unless asked for)."""
    (work / "fact.txt").write_text("The build token is 7315-QX.\n")
    for i in range(30):
        (work / f"big{i}.txt").write_text("".join(f"row {j} " + "y" * 40 + "\n" for j in range(60)))
    calls = [("read_file", {"path": "fact.txt"})] + [("read_file", {"path": f"big{i}.txt"}) for i in range(30)]
    calls += [("recall", {"query": "fact.txt"}), ("recall", {"query": "[result 1]"}), ("recall", {"query": "99"}),
              ("recall", {"query": "zebra"}), ("finish", {"answer": "7315-QX"})]
    made = iter(calls)
    server = FakeServer(lambda msgs: {"calls": [next(made)]}, window=1024, longkv=True)
    with _agent(server, work, tmp_path, reply_tokens=128, max_steps=50) as agent:
        assert agent.options["recall"] and "recall" in agent.toolbox
        res = agent.run("What is the build token?")
    server.close()
    assert (res.status, res.answer, server.errors) == ("finished", "7315-QX", [])
    assert "recall" in [t["function"]["name"] for t in server.requests[-1]["tools"]]
    last = tool_results(server.requests[-1]["messages"])
    assert not any("7315-QX" in r for r in last[:-4])  # the read of fact.txt has left the window ...
    assert last[-4:-2] == ["[result 32]\n    1  The build token is 7315-QX.", "[result 33]\n    1  The build token is 7315-QX."]
    assert last[-2] == "[result 34]\nerror: recall: there is no result 99: the results so far are numbered 1 to 33"
    assert last[-1] == "[result 35]\nerror: recall: no earlier result holds 'zebra': try other words (a file name, a command) or a result's number"
    log = RunLog(tmp_path / "runs")
    first = next(e.data for e in log.events(res.run) if e.kind == "tool_result")
    assert first["context"] == "    1  The build token is 7315-QX."  # the log keeps the text without its number
    log.close()
    plain = FakeServer(scripted([("read_file", {"path": "fact.txt"}), ("finish", {"answer": "x"})]))
    with _agent(plain, work, tmp_path) as agent:
        assert not agent.options["recall"] and "recall" not in agent.toolbox
        agent.run("Read it")
    with _agent(plain, work, tmp_path, recall=True) as agent:
        assert "recall" in agent.toolbox
    plain.close()
    assert tool_results(plain.requests[-1]["messages"]) == ["    1  The build token is 7315-QX."]


def test_the_files_a_run_has_seen_come_back_with_its_log(work: Path, tmp_path: Path) -> None:
    """In a run, write_file over an existing file is refused until read_file has read it; the set of files seen is
    rebuilt from the run log (so a resumed run keeps it)."""
    (work / "notes.txt").write_text("keep me\n")
    calls = [("write_file", {"path": "notes.txt", "content": "new"}), ("read_file", {"path": "notes.txt"}),
             ("write_file", {"path": "notes.txt", "content": "new\n"}), ("finish", {"answer": "done"})]
    server = FakeServer(scripted(calls))
    with _agent(server, work, tmp_path) as agent:
        res = agent.run("Rewrite notes.txt")
    server.close()
    results = tool_results(server.requests[-1]["messages"])
    assert results[-3].startswith("error: write_file: notes.txt exists and you have not read it")
    assert results[-1] == "wrote notes.txt (1 line, 4 bytes); lines of the old text not in the new one: 1 of 1"
    assert (work / "notes.txt").read_text() == "new\n"
    log = RunLog(tmp_path / "runs")
    assert RunState.replay(log.events(res.run)).files_seen == {"notes.txt"}
    log.close()


def test_runs_in_other_folders_send_the_same_system_message_and_tools(tmp_path: Path) -> None:
    """What leads every request (the system message and the tools) is the same for every run of one tool set,
    whatever the folder or task, so a server's prefix cache holds it once for all runs."""
    firsts = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        server = FakeServer(scripted([("finish", {"answer": name})]))
        with _agent(server, tmp_path / name, tmp_path / name) as agent:
            agent.run(f"Task {name}")
        server.close()
        firsts.append((server.requests[0]["messages"][0], server.requests[0]["tools"]))
    assert firsts[0] == firsts[1] and str(tmp_path) not in json.dumps(firsts[0])


def test_recall_ranks_results_by_number_call_or_words(work: Path) -> None:
    results = [('read_file({"path": "a.env"})', "TOKEN=1"), ("bash({\"command\": \"ls\"})", "a.env b.env"),
               ('read_file({"path": "b.env"})', "TOKEN=2\nPORT=80"), ("search({})", "nothing")]  # fmt: skip
    assert [rank_results(results, q) for q in ("2", "result 3", "[result 1]", " #4 ")] == [[2], [3], [1], [4]]
    assert rank_results(results, "a.env") == [2, 1]  # a tie: the later first (the ls output names it too)
    assert rank_results(results, "read_file a.env") == [1, 3, 2]  # more of the words first
    assert rank_results(results, "TOKEN") == [3, 1] and rank_results(results, "token=1")[0] == 1  # any case; the whole query counts double
    many = [("bash({})", "the billing service settings"), ("bash({})", "settings of the search"), ("bash({})", "settings of the mailer")]
    assert rank_results(many, "settings of the billing")[0] == 1  # a rare word outweighs common ones
    for q, msg in [("0", "there is no result 0: the results so far are numbered 1 to 4"), ("?!", "has no words"), ("zebra", "no earlier result holds")]:
        with pytest.raises(ToolError, match=re.escape(msg)):
            rank_results(results, q)
    with pytest.raises(ToolError, match="there is no tool result yet"):
        rank_results([], "1")
    # copies made by recall, and plan results, are not searched by words (a number still names them)
    looped = [('bash({"command": "pytest -q"})', "no tests ran"), ('plan({"plan": "1. run pytest -q"})', "plan updated"),
              ('recall({"query": "pytest -q"})', "no tests ran")]  # fmt: skip
    assert rank_results(looped, "pytest -q") == [1] and rank_results(looped, "3") == [3]
    with pytest.raises(ToolError, match="no earlier result holds 'plan updated'"):
        rank_results(looped, "plan updated")
    # a call not run because it repeated result 1: never found by words, and its number names result 1
    repeated = [*looped[:1], ('bash({"command": "pytest -q"})', "not run: this is the same call as result 1, and no file ...")]
    assert rank_results(repeated, "pytest -q", {2: 1}) == [1] and rank_results(repeated, "2", {2: 1}) == [1]
    with pytest.raises(ToolError, match="no earlier result holds 'same call'"):
        rank_results(repeated, "same call", {2: 1})
    # the tool: one result word for word; several matches, as many as fit the room of one result, each numbered
    ctx = ToolContext(work, None, results, limit=60)
    assert recall.call(ctx, {"query": "1"}) == "TOKEN=1"
    assert recall.call(ctx, {"query": "TOKEN"}) == "[result 3]\nTOKEN=2\nPORT=80\n\n[result 1]\nTOKEN=1"
    ctx.limit = 30
    assert recall.call(ctx, {"query": "TOKEN"}) == "[result 3]\nTOKEN=2\nPORT=80"


def test_resume_with_a_higher_step_cap_goes_on_after_the_cap(work: Path, tmp_path: Path) -> None:
    def script(msgs: list[dict]) -> dict:
        if "Call finish now" in (msgs[-1].get("content") or ""):
            return {"calls": [("finish", {"answer": "partial"})]}
        if len(tool_results(msgs)) >= 4:
            return {"calls": [("finish", {"answer": "all 4 read"})]}
        return {"calls": [("search", {"pattern": f"n{len(msgs)}"})]}

    server = FakeServer(script)
    with _agent(server, work, tmp_path, max_steps=2) as agent:
        res = agent.run("Search four times")
        assert (res.status, res.answer, res.steps) == ("stopped", "partial", 3)
        assert agent.resume(res.run).answer == "partial"  # no message, no new cap: nothing to do
        with pytest.raises(LongKVError, match="has taken 3 steps: give --max-steps above that"):
            agent.resume(res.run, max_steps=3)
        more = agent.resume(res.run, max_steps=10)
    server.close()
    assert (more.status, more.answer, more.steps) == ("finished", "all 4 read", 5)


def test_resume_without_the_runs_own_tools_is_refused_before_it_changes_anything(work: Path, tmp_path: Path) -> None:
    @tool
    def deploy(ctx: ToolContext, target: str) -> str:
        """Deploy to a target.

        Args:
            target: where.
        """
        return f"deployed to {target}"

    server = FakeServer(lambda msgs: {"calls": [("finish", {"answer": "done"})]})
    with _agent(server, work, tmp_path, tools=[deploy], max_steps=1) as agent:
        res = agent.run("Deploy it")
    with _agent(server, work, tmp_path) as plain, pytest.raises(LongKVError) as e:
        plain.resume(res.run, message="Again.")
    assert str(e.value) == (f"run {res.run} was started with tools this agent lacks (deploy): resume it from Python with the "
                            f"same tools, Agent(tools=[...]).resume({res.run!r})")  # fmt: skip
    log = RunLog(tmp_path / "runs")
    assert log.info(res.run).status == "finished" and [e.kind for e in log.events(res.run)].count("resume") == 0
    log.close()
    with _agent(server, work, tmp_path, tools=[deploy]) as same:
        assert same.resume(res.run, message="Again.").answer == "done"
    server.close()


def test_the_window_comes_from_the_server(work: Path, tmp_path: Path) -> None:
    server = FakeServer(lambda m: {"content": "ok"}, window=1234)
    with _agent(server, work, tmp_path) as agent:
        assert agent.window == 1234
    blind = FakeServer(lambda m: {"content": "ok"}, report_window=False)
    with pytest.raises(LongKVError, match="reports no context window for 'fake': pass --context-window TOKENS"):
        _agent(blind, work, tmp_path)
    with _agent(blind, work, tmp_path, context_window=999) as agent:
        assert agent.window == 999
    server.close()
    blind.close()
    with pytest.raises(LongKVError, match="cannot reach .*: start the server"):
        Agent(server="http://127.0.0.1:9/v1", workdir=work, runs_dir=tmp_path / "runs", sandbox=False)
    for bad in ("notaurl", "127.0.0.1:8000/v1", "ftp://host/v1"):
        with pytest.raises(LongKVError, match=f"the server URL '{re.escape(bad)}' is not an http\\(s\\) URL: give its API base, e.g. http://127.0.0.1:8000/v1"):
            Agent(server=bad, workdir=work, runs_dir=tmp_path / "runs", sandbox=False)
    empty = tmp_path / "www"
    empty.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(empty)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    with pytest.raises(LongKVError, match=re.escape(f"{base}/models is not found (HTTP 404): give the API's base URL, which for "
                                                    f"longkv serve, vLLM and llama.cpp ends in /v1 (e.g. {base}/v1)")):  # fmt: skip
        Agent(server=base, workdir=work, runs_dir=tmp_path / "runs", sandbox=False)
    httpd.shutdown()
    named = FakeServer(lambda m: {"content": "ok"})
    with pytest.raises(LongKVError, match=re.escape(f"{named.url}/models has no model 'nope': it serves fake; pass one of them to --model-id")):
        Agent(server=named.url, model_id="nope", workdir=work, runs_dir=tmp_path / "runs", sandbox=False)
    named.close()
    with pytest.raises(LongKVError, match="is not a folder"):
        Agent(server=server.url, workdir=work / "missing", runs_dir=tmp_path / "runs", sandbox=False)


# --------------------------------------------------------------------------- durability


KILL_SCRIPT = [
    ("plan", {"plan": "1. log one\n2. write a\n3. log two\n4. edit a\n5. log three"}),
    ("bash", {"command": "echo one >> log.txt; sleep 0.2"}),
    ("write_file", {"path": "a.txt", "content": "alpha\n"}),
    ("bash", {"command": "sleep 0.1; echo two >> log.txt; sleep 0.1"}),
    ("edit_file", {"path": "a.txt", "old": "alpha", "new": "beta"}),
    ("read_file", {"path": "a.txt"}),
    ("python", {"code": "open('log.txt', 'a').write('three\\n')"}),
    ("finish", {"answer": "done: log has three lines, a.txt says beta"}),
]


def _drive(url: str, work: str, runs: str, run_id: str | None) -> None:
    agent = Agent(server=url, workdir=work, runs_dir=runs, sandbox=SANDBOX)
    if run_id is None:
        agent.run("Follow the plan")
    else:
        agent.resume(run_id)
    os._exit(0)


@needs_sandbox
def test_kill_9_at_random_points_then_resume_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """20 trials: the run is killed with SIGKILL at a random moment (during generation, a tool, or a log write),
    then resumed (in a third of the trials killed once more and resumed again). Every trial ends with the same
    files and answer as an uninterrupted run, and no side effect ran twice."""
    server = FakeServer(scripted(KILL_SCRIPT), delay_s=0.05)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    with Agent(server=server.url, workdir=ref_dir, runs_dir=tmp_path / "ref-runs", sandbox=True) as agent:
        t0 = time.perf_counter()
        ref = agent.run("Follow the plan")
        duration = time.perf_counter() - t0
    want = {p.name: p.read_text() for p in ref_dir.iterdir()}
    assert ref.status == "finished" and want == {"log.txt": "one\ntwo\nthree\n", "a.txt": "beta\n"}
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(7)
    phases = []
    for trial in range(20):
        work, runs = tmp_path / f"w{trial}", tmp_path / f"r{trial}"
        work.mkdir()
        run_id = None
        for _attempt in range(2 if trial % 3 == 0 else 1):
            p = ctx.Process(target=_drive, args=(server.url, str(work), str(runs), run_id))
            p.start()
            time.sleep(rng.uniform(0.02, duration * 0.9))
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            log = RunLog(runs)
            runs_now = log.runs()
            if runs_now:
                run_id = runs_now[0].id
                events = log.events(run_id)
                phases.append(events[-1].kind if events else "none")
                # never stuck "running": a tool's process forked in the instant of the kill holds the dead agent's
                # lock until its exec closes it (milliseconds, longer on a loaded machine), so allow it a few seconds
                deadline = time.monotonic() + 5.0
                while log.info(run_id).status == "running" and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert log.info(run_id).status in ("interrupted", "finished")
            log.close()
        if run_id is None:  # killed before the run was created: start again
            p = ctx.Process(target=_drive, args=(server.url, str(work), str(runs), None))
        else:
            p = ctx.Process(target=_drive, args=(server.url, str(work), str(runs), run_id))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        log = RunLog(runs)
        info = log.runs()[0]
        assert (info.status, info.answer) == ("finished", ref.answer), trial
        got = {q.name: q.read_text() for q in work.iterdir()}
        assert got == want, (trial, got)
        log.close()
    server.close()
    assert {"request", "tool_start"} <= set(phases), phases  # killed mid-generation and mid-tool at least once each


def test_a_second_driver_is_refused_and_a_dead_owner_is_not_running(work: Path, tmp_path: Path) -> None:
    log = RunLog(tmp_path / "runs")
    run_id = log.create("task", work)
    with log.drive(run_id):
        assert log.info(run_id).status == "running" and log.owner(run_id) == os.getpid()
        other = RunLog(tmp_path / "runs")
        with pytest.raises(LongKVError, match=f"run {run_id} is being driven by pid {os.getpid()}"), other.drive(run_id):
            pass
    assert log.info(run_id).status == "interrupted" and log.owner(run_id) is None
    with pytest.raises(LongKVError, match="no run 'nope'"):
        log.info("nope")


def test_a_run_is_named_by_its_id_or_a_unique_start_or_end_of_it(work: Path, tmp_path: Path) -> None:
    log = RunLog(tmp_path / "runs")
    a, b = "20261205-051500-ab12", "20261205-051500-cd34"  # two runs started in the same second
    for run_id in (a, b):
        log.db.execute("INSERT INTO runs VALUES (?, 'task', ?, 0, 'finished', NULL, NULL)", (run_id, str(work)))
    assert [log.info(x).id for x in (a, a[:-3], a[-4:], b[-4:], "d34")] == [a, a, a, b, b]
    with pytest.raises(LongKVError, match=r"matches \d+ runs .*: give more of the id"):
        log.info(a[:8])  # the date they share
    with pytest.raises(LongKVError, match="no run '%'"):
        log.info("%")  # not a wildcard


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LONGKV_HOME": str(cwd / "home")}
    return subprocess.run([sys.executable, "-m", "longkv", "agent", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_cli_run_show_and_resume(work: Path, tmp_path: Path) -> None:
    server = FakeServer(scripted([("write_file", {"path": "n.txt", "content": "7"}), ("finish", {"answer": "7"})]))
    sandbox = [] if SANDBOX else ["--no-sandbox"]
    proc = _cli(["run", "Write 7 to n.txt", "--server", server.url, "--workdir", str(work), "--json", *sandbox], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["status"], out["answer"], out["steps"]) == ("finished", "7", 2) and (work / "n.txt").read_text() == "7"
    assert "step 1 write_file(" in proc.stderr and "write_file -> wrote n.txt (1 line, 1 byte)" in proc.stderr  # progress
    shown = _cli(["show", out["run"], "--json"], tmp_path)
    s = json.loads(shown.stdout)
    assert (s["status"], s["steps"], [c["name"] for r in s["trajectory"] for c in r.get("calls", [])]) == ("finished", 2, ["write_file", "finish"])
    assert "no runs yet" in _cli(["show", "--runs-dir", str(tmp_path / "empty")], tmp_path).stdout
    table = _cli(["show", out["run"][:12]], tmp_path)
    assert table.returncode == 0 and "write_file (ok)" in table.stdout and "2 steps" in table.stdout
    server.close()
    again = _cli(["resume", out["run"][-4:], "--json"], tmp_path)  # ended, no message: no server or model needed
    assert again.returncode == 0 and json.loads(again.stdout)["answer"] == "7" and len(server.requests) == 2
    assert f"run {out['run']} has ended (finished): pass --message to go on with it" in again.stderr


def test_a_progress_line_gives_a_tool_results_first_line_its_size_and_its_status() -> None:
    assert gist("a.py\nb.py\nc.py\n[exit code 0]") == "a.py (+2 lines) [exit code 0]"
    assert gist("\n  only line  \n") == "only line" and gist("") == "" and gist("[exit code 1]") == "[exit code 1]"
    assert gist("x" * 150 + "\n[killed: time limit reached after 30.0 s]", width=20) == "x" * 17 + "... [killed: time limit reached after 30.0 s]"
    assert gist("    1  row\n    2  row\n[3 more lines: read_file with start=3]") == "1  row (+2 lines)"


def test_cli_a_run_stopped_at_a_limit_exits_3(work: Path, tmp_path: Path) -> None:
    server = FakeServer(lambda msgs: {"calls": [("bash", {"command": "echo hi"})]})
    sandbox = [] if SANDBOX else ["--no-sandbox"]
    proc = _cli(["run", "Say hi", "--server", server.url, "--workdir", str(work), "--max-steps", "1", "--json", *sandbox], tmp_path)
    assert proc.returncode == 3 and json.loads(proc.stdout)["status"] == "stopped", proc.stderr
    # in words: the answer alone on stdout, and before it on stderr that it was asked for at a limit
    proc = _cli(["run", "Say hi", "--server", server.url, "--workdir", str(work), "--max-steps", "1", *sandbox], tmp_path)
    server.close()
    assert proc.returncode == 3 and "hi" in proc.stdout and "stopped" not in proc.stdout
    warning = " ".join(proc.stderr.split())
    assert "stopped: The step limit (1 model call) is reached; the answer below is the model's best effort" in warning, proc.stderr


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["run", " ", "--server", "URL"], "the task is empty"),
        (["run", " ", "--model", "missing.gguf"], "the task is empty"),  # before any model loads
        (["run", "x", "--server", "URL", "--workdir", "missing"], "is not a folder: create it"),
        (["run", "x", "--server", "URL", "--model", "m.gguf"], "--model and --server both given"),
        (["run", "@nofile.md", "--server", "URL"], "cannot read the task file 'nofile.md'"),
        (["run", "x", "--model", "missing.gguf", "--temperature", "-1"], "temperature must be 0 to 2, got -1.0"),  # before loading
        (["run", "x", "--server", "URL", "--max-steps", "0"], "max_steps (--max-steps) must be at least 1, got 0"),
        (["run", "x", "--server", "URL", "--max-seconds", "0"], "max_seconds (--max-seconds) must be above 0, got 0.0"),
        (["run", "x", "--model", "m.gguf", "--threads", "0"], "threads (--threads) must be at least 1, got 0"),
        (["run", "x", "--server", "notaurl"], "the server URL 'notaurl' is not an http(s) URL"),
        (["resume", "nope"], "no run 'nope'"),
        (["show", "nope"], "no run 'nope'"),
        (["show", "--step", "2"], "--step needs a run: longkv agent show RUN --step N"),
    ],
)
def test_cli_user_errors_are_one_line(args: list[str], msg: str, tmp_path: Path) -> None:
    server = FakeServer(lambda m: {"content": "ok"})
    proc = _cli([a.replace("URL", server.url) for a in args] + ([] if SANDBOX or args[0] != "run" else ["--no-sandbox"]), tmp_path)
    server.close()
    assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_task_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin.md").write_bytes(b"fix \xf8\xff the bug")
    proc = _cli(["run", "@bin.md", "--server", "http://127.0.0.1:9/v1"], tmp_path)
    assert proc.returncode == 2 and "the task file 'bin.md' is not UTF-8 text (byte 4): save it as UTF-8" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_showing_runs_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "runs"
    shown = _cli(["show", "--runs-dir", str(missing)], tmp_path)
    assert shown.returncode == 0 and f"no runs yet in {missing}" in " ".join(shown.stdout.split()), shown.stdout
    one = _cli(["show", "abcd", "--runs-dir", str(missing)], tmp_path)
    assert one.returncode == 2 and "no run 'abcd'" in one.stderr
    assert not (tmp_path / "nope").exists()


def test_a_failed_runs_best_answer_is_a_tool_result_without_its_label(work: Path, tmp_path: Path) -> None:
    def script(msgs: list[dict]) -> dict:
        if tool_results(msgs):
            raise RuntimeError("the model server broke")  # the fake answers no more: the run fails
        return {"calls": [("bash", {"command": "echo 42"})]}

    server = FakeServer(script, longkv=True)
    with _agent(server, work, tmp_path, plan=False) as agent:
        res = agent.run("Print 42")
    server.close()
    assert res.status == "failed" and res.answer.startswith("42\n"), res
    assert tool_results(server.requests[-1]["messages"])[0].startswith("[result 1]\n42\n")  # the context keeps the label


def test_agent_rm_removes_runs_and_their_kv_snapshots(work: Path, tmp_path: Path) -> None:
    server = FakeServer(lambda msgs: {"calls": [("finish", {"answer": "done"})]})
    with _agent(server, work, tmp_path) as agent:
        runs = [agent.run(f"Task {i}").run for i in range(3)]
    server.close()
    kv = tmp_path / "runs" / "kv"
    kv.mkdir()
    (kv / f"{runs[0]}-0123456789ab.kv").write_bytes(b"x" * (3 << 20))  # what an in-process run saves for resume
    (kv / "other-0123456789ab.kv").write_bytes(b"y")
    log = RunLog(tmp_path / "runs")
    with log.drive(runs[2]):  # a live driver: refused, nothing removed
        busy = _cli(["rm", runs[0], runs[2], "--runs-dir", str(tmp_path / "runs")], tmp_path)
        assert busy.returncode == 2 and f"run {runs[2]} is being driven by pid {os.getpid()}" in busy.stderr, busy.stderr
    assert busy.stderr.strip().endswith("(nothing was removed)") and sorted(r.id for r in log.runs()) == sorted(runs)
    one = _cli(["rm", runs[0][-4:], "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert one.returncode == 0 and one.stdout == f"removed {runs[0]} (freed 3.0 MiB of KV)\n", one.stderr
    assert sorted(p.name for p in kv.iterdir()) == ["other-0123456789ab.kv"]
    rest = _cli(["rm", "--ended", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert rest.returncode == 0 and rest.stdout.splitlines() == [f"removed {r}" for r in runs[:0:-1]], rest.stdout
    assert log.runs() == [] and log.events(runs[1]) == []
    log.close()
    none = _cli(["rm", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert none.returncode == 2 and "name the runs to remove, or pass --ended" in none.stderr
    both = _cli(["rm", "abcd", "--ended", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert both.returncode == 2 and "name runs or pass --ended, not both" in both.stderr


def test_an_exec_result_reads_as_the_bash_tool_shows_it() -> None:
    from longkv.agent.sandbox import ExecResult

    assert str(ExecResult(0, "3 README.md\n", None, 0.04, False)) == "3 README.md\n[exit code 0]"
    assert str(ExecResult(None, "", "time", 60.0, False)) == "[killed: time limit reached after 60.0 s]"
    assert str(ExecResult(None, "yyyy", "output", 1.25, True)) == "yyyy\n[output cut at the sandbox's output limit] [killed: output limit reached after 1.2 s]"
