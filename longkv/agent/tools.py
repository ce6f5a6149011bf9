"""The agent's built-in tools, and the :class:`Toolbox` a run calls them through.

Each is a typed function made a tool by :func:`~longkv.agent.toolkit.tool` (its schema
from the signature and docstring). Built in: ``bash``, ``python``, ``read_file``, ``write_file``, ``edit_file``,
``search``, ``plan`` and ``finish``, and ``recall`` where the run numbers its
tool results (KV memory). ``read_file``, ``search`` and ``recall`` are
idempotent: a resumed run re-runs them if they were cut off; the others are
never re-run.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longkv.agent.state import result_header
from longkv.agent.toolkit import Tool, ToolContext, ToolError, tool
from longkv.agent.workdir import changes, files, snapshot
from longkv.errors import LongKVError

# --------------------------------------------------------------------------- built-in tools


def _exec_report(res: Any) -> str:
    """A sandbox result as the model reads it: the output, then the exit status (or why it was killed)."""
    return str(res) + (_not_found_hint(res.output) if res.exit_code == 127 else "")


TOOL_NAMES = frozenset({"read_file", "write_file", "edit_file", "search", "recall", "plan", "finish"})
EDITORS = frozenset({"nano", "vi", "vim", "nvim", "emacs", "pico", "micro"})
SHELL_WORDS = frozenset({"python", "python3", "pip", "pytest", "ls", "cat", "cd", "grep", "sed", "awk", "echo", "git", "mkdir",
                         "rm", "cp", "mv", "find", "head", "tail", "wc", "sort", "bash", "sh", "chmod", "touch"})  # fmt: skip


def _not_found_hint(output: str) -> str:
    """What to do instead of a command the shell did not find, when it is one of the agent's tools or an
    interactive editor (``""`` otherwise)."""
    for name in re.findall(r"([\w.-]+): command not found", output):
        if name in TOOL_NAMES:
            return f"\n[{name} is one of your tools, not a shell command: call the {name} tool itself]"
        if name in EDITORS:
            return "\n[there is no interactive editor here: change files with edit_file or write_file]"
    return ""


def _exec(ctx: ToolContext, run: Callable[[], Any]) -> str:
    """Run a sandbox call and report it: its output, exit status, and the workdir files it changed (or that it
    changed none, when it printed nothing: a silent ``sed -i`` that matched nothing looks like one that worked)."""
    before = snapshot(ctx.workdir, digests=True)
    res = run()
    report = _exec_report(res)
    changed = changes(before, snapshot(ctx.workdir), ctx.workdir)
    if changed:
        shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
        report += f"\n[files changed: {shown}]"
    elif not res.output.strip():
        report += "\n[no file changed]"
    return report


@tool
def bash(ctx: ToolContext, command: str) -> str:
    """Run a bash command in the workdir (sandboxed: no network, files outside the workdir read-only) and return its output and exit code.

    Args:
        command: the command line, e.g. "ls -la" or "python -m pytest -q".
    """
    if not command.strip():
        raise ToolError("bash: the command is empty: pass a command line such as 'ls'")
    return _exec(ctx, lambda: ctx.sandbox.bash(command))


@tool
def python(ctx: ToolContext, code: str) -> str:
    """Run a Python program in the workdir (sandboxed) and return what it prints and its exit code.

    Args:
        code: the program's source; print what you want to see.
    """
    if not code.strip():
        raise ToolError("python: the code is empty: pass a program, e.g. print(1 + 1)")
    if is_shell_command(code):
        raise ToolError(f"python: {code.strip().splitlines()[0][:100]!r} is a shell command, not Python: run it with the bash tool")
    return _exec(ctx, lambda: ctx.sandbox.python(code))


def is_shell_command(code: str) -> bool:
    """Whether ``code`` sent to the python tool is a shell command line (``ls -la``, ``python3 app.py``), not Python."""
    words = code.split()
    return bool(words) and words[0] in SHELL_WORDS and _parse_error("code.py", code) is not None


READ_LINES = 200
"""Most lines one ``read_file`` call shows (it names the ``start`` of the next window)."""
READ_CHARS = 6000
"""Most characters one ``read_file`` call shows: a window ends at the last whole line under it."""


@tool(idempotent=True)
def read_file(ctx: ToolContext, path: str, start: int = 1) -> str:
    """Read a text file of the workdir with line numbers, up to 200 lines from start; a long file is read window by window.

    Args:
        path: file path relative to the workdir.
        start: first line to show (1-based; 0 or less reads from the top); leave it out to read from the top.
    """
    p = ctx.path(path)
    if not p.is_file():
        if same := ctx.namesakes(p):
            raise ToolError(f"read_file: no file {path!r}; a file of that name is at {' and '.join(same)}: give the path from the workdir")
        near = sorted(q.name for q in p.parent.iterdir())[:20] if p.parent.is_dir() else []
        where = "the workdir" if p.parent == ctx.workdir.resolve() else f"{ctx.relative(p.parent)}/"
        raise ToolError(f"read_file: no file {path!r}" + (f"; {where} holds: {', '.join(near)}" if near else ""))
    lines = p.read_text(errors="replace").splitlines()
    ctx.seen.add(path)
    start = max(start, 1)  # small models count from 0
    if start > len(lines):
        return f"[{path} has {len(lines)} lines: start must be at most {len(lines)}]" if lines else f"[{path} is empty]"
    shown: list[str] = []
    size = 0
    for i in range(start, min(start + READ_LINES, len(lines) + 1)):
        row = f"{i:>5}  {lines[i - 1]}"
        if shown and size + len(row) + 1 > READ_CHARS:
            break
        if len(row) > READ_CHARS:  # one huge line (minified JSON, a data dump) still shows its head
            row = row[:READ_CHARS] + f" [line {i} cut: {len(lines[i - 1])} characters; bash (cut -c) shows the rest]"
        shown.append(row)
        size += len(row) + 1
    stop = start + len(shown) - 1
    more = f"\n[{len(lines) - stop} more lines: read_file with start={stop + 1}]" if stop < len(lines) else ""
    return "\n".join(shown) + more


@tool
def write_file(ctx: ToolContext, path: str, content: str) -> str:
    """Create a file of the workdir, or replace one you have read, with the given content (parent folders are created).

    Args:
        path: file path relative to the workdir.
        content: the whole new content of the file.
    """
    p = ctx.path(path)
    if p.is_dir():
        raise ToolError(f"write_file: {path!r} is a folder: give a file path")
    if p.is_file() and p.stat().st_size and not ctx.has_seen(p):
        raise ToolError(f"write_file: {path} exists and you have not read it: call read_file on it first, "
                        "then change it with edit_file (or write_file its whole new text)")
    _not_a_label("write_file", path, "content", content)
    current = p.read_text(errors="replace") if p.is_file() else None
    notes = []
    if current is None and (same := ctx.namesakes(p)):  # a new file named like one elsewhere: meant to be that one?
        notes.append(f"a new file; one of that name is at {' and '.join(same)}")
    if not path.endswith(FENCED) and not (current or "").lstrip().startswith("```") and (inner := _unfence(content)) is not None:
        content = inner  # a model's code block: the fence is not the file's
        notes.append("the ``` fence around it was removed")
    if _numbered(content):  # pasted from read_file: the file's own lines are meant, unless the file is numbered itself
        if current is None:
            if _numbered(content, padded=True):
                raise ToolError(f"write_file: {path} was not written: content starts its lines with read_file's line numbers "
                                "('    1  ', '    2  ', ...): send the file's text without them")
        elif not _numbered(current):
            nums = [int(m.group(1)) for ln in content.splitlines() if (m := _NUMBERED.match(ln))]
            total = len(current.splitlines())
            if nums[0] != 1 or nums[-1] < total:  # a part of the file pasted over all of it would lose the rest
                raise ToolError(f"write_file: {path} was not written: content is lines {nums[0]}-{nums[-1]} of its {total} "
                                "(with read_file's line numbers), and write_file replaces the whole file: change a part "
                                "of a file with edit_file")
            content = _unnumber(content)
            notes.append(NUMBERS_REMOVED)
    if current is not None and path.endswith(CHECKED):
        _check_parses("write_file", path, current, content)
    if current is not None:  # what the old text loses: a model that writes back an excerpt sees it here
        gone = len(set(ln for ln in current.splitlines() if ln.strip()) - set(content.splitlines()))
        if gone:
            notes.append(f"lines of the old text not in the new one: {gone} of {len(current.splitlines())}")
    p.parent.mkdir(parents=True, exist_ok=True)
    _replace(p, content)
    ctx.seen.add(path)
    return f"wrote {path} ({_count(len(content.splitlines()), 'line')}, {_count(len(content.encode()), 'byte')})" + "".join(f"; {n}" for n in notes)


_LABEL = re.compile(r"\s*\[?\s*result\s+\d+\s*\]?\s*", re.I)


def _not_a_label(name: str, path: str, arg: str, text: str) -> None:
    """Refuse a text that is only a tool result's label (``[result 3]``): the model meant that result's text.

    Qwen2.5-Coder-1.5B wrote ``result 3``, ``result 8``, ... over a source file six times in one run.
    """
    if _LABEL.fullmatch(text):
        raise ToolError(f"{name}: {path} was not changed: {arg} is only the label of a tool result ([result N]), not its "
                        f"text: send the text itself")  # one text for every label: the same dead end reads as the same error


FENCED = (".md", ".markdown", ".rst")  # kinds of file whose text may itself open with a ``` fence


def _unfence(text: str) -> str | None:
    """The inside of ``text`` when all of it is one Markdown code block (a first line that opens a ``` fence,
    with or without a language, and a last line that closes it), else None."""
    lines = text.strip("\n").split("\n")
    if len(lines) >= 2 and re.fullmatch(r"```[\w+.-]*\s*", lines[0]) and lines[-1].strip() == "```" and not any(ln.startswith("```") for ln in lines[1:-1]):
        return "\n".join(lines[1:-1]) + "\n"
    return None


def _replace(p: Path, text: str) -> None:
    """Write ``text`` (UTF-8, line endings as given) over ``p`` all or nothing, keeping an existing file's mode."""
    tmp = p.with_name(p.name + ".longkv-tmp")
    tmp.write_bytes(text.encode())
    if p.exists():
        shutil.copymode(p, tmp)
    tmp.replace(p)


_NUMBERED = re.compile(r"\s*(\d+)(?:  |\s*$)")


def _numbered(text: str, least: int = 2, padded: bool = False) -> bool:
    """Whether ``text`` starts every non-blank line with increasing numbers, as read_file shows a file (``1  ``,
    then the line): a model that pastes what it read with its line numbers (some lines may be left out, a blank
    line may keep its number alone). At least ``least`` lines must have text after their number; ``padded``:
    each number right-aligned in 5 characters, exactly as read_file prints it."""
    nums, filled = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        m = _NUMBERED.match(ln)
        if m is None or (padded and m.end(1) != 5):
            return False
        nums.append(int(m.group(1)))
        filled += bool(ln[m.end() :].strip())
    return filled >= least and all(b > a for a, b in itertools.pairwise(nums))


def _unnumber(text: str) -> str:
    """``text`` without read_file's line numbers (each line's number and the two spaces after it)."""
    return "\n".join(ln[m.end() :] if (m := _NUMBERED.match(ln)) else ln for ln in text.split("\n"))


NUMBERS_REMOVED = "read_file's line numbers were removed from what you sent"


CHECKED = (".py", ".json")  # kinds of file a write or an edit may not leave unparseable


def _parse_error(path: str, text: str) -> str | None:
    """Why ``text`` does not parse as a ``.py`` or ``.json`` file (None: it parses, or another kind of file)."""
    try:
        if path.endswith(".py"):
            with warnings.catch_warnings():  # an invalid escape in the file is the file's business, not a refusal
                warnings.simplefilter("ignore")
                compile(text, path, "exec", dont_inherit=True)
        elif path.endswith(".json"):
            json.loads(text)
    except SyntaxError as exc:
        return f"not valid Python ({exc.msg}, line {exc.lineno})"
    except ValueError as exc:  # json.JSONDecodeError, or a null byte in Python source
        return f"not valid {'JSON' if path.endswith('.json') else 'Python'} ({exc})"
    return None


def _check_parses(name: str, path: str, before: str, after: str) -> None:
    """Refuse a write that would break an existing Python or JSON file that parses now.

    A file that was already broken may be written in any form (the edit may be the first of a fix), and a new
    file in any form (JSON Lines, a template, an empty file).

    Raises:
        ToolError: the new text does not parse and the old one did; the file is unchanged.
    """
    why = _parse_error(path, after)
    if why is None or _parse_error(path, before) is not None:
        return
    raise ToolError(f"{name}: {path} was not changed: the new text is {why}. Fix it and call again "
                    "(the file's own text, without read_file's line numbers or ``` fences); if it is meant not to "
                    "parse here (a template, another Python version), write it with bash")


@tool
def edit_file(ctx: ToolContext, path: str, old: str, new: str) -> str:
    """Replace one exact occurrence of a text in a file of the workdir.

    Args:
        path: file path relative to the workdir.
        old: the exact text to replace, including indentation; it must occur exactly once.
        new: the replacement text.
    """
    p = ctx.path(path)
    if not p.is_file():
        if same := ctx.namesakes(p):
            raise ToolError(f"edit_file: no file {path!r}; a file of that name is at {' and '.join(same)}: give the path from the workdir")
        raise ToolError(f"edit_file: no file {path!r}: create it with write_file")
    if not old:
        raise ToolError("edit_file: old is empty: give the exact text to replace (read_file shows it)")
    try:
        text = p.read_bytes().decode()
    except UnicodeDecodeError:
        raise ToolError(f"edit_file: {path} is not UTF-8 text: change it with bash (e.g. sed) or python") from None
    if "\r\n" in text and "\r\n" not in old:  # a CRLF file: the model sees and writes its lines with \n
        old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
    note = ""
    if not _numbered(text):  # pasted from read_file with its line numbers (a single line too, where only that matches)
        if old not in text and _numbered(old, least=1) and _unnumber(old) in text:
            old, note = _unnumber(old), f"; {NUMBERS_REMOVED}"
        if _numbered(new, least=1 if note else 2):
            new, note = _unnumber(new), f"; {NUMBERS_REMOVED}"
    _not_a_label("edit_file", path, "new", new)
    if old == new:
        raise ToolError(f"edit_file: old and new are the same text, so {path} would not change: pass the changed text as new")
    n = text.count(old)
    if n == 0:
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), None)
        if old in new and last is not None:  # the new text around a missing old: an insertion, which edit_file anchors
            raise ToolError(f"edit_file: the text to replace is not in {path}: to add text, give as old a line that is there "
                            f"(the last one is {last[:200]!r}) and as new that line with the added text")
        raise ToolError(f"edit_file: the text to replace is not in {path}{_closest(text, old)}: copy the lines exactly as "
                        "read_file shows them, with their indentation")
    if n > 1:
        at = [_line_of(text, k) for k in _find_all(text, old)]
        raise ToolError(f"edit_file: the text to replace occurs {n} times in {path} (at lines {', '.join(map(str, at[:10]))}): "
                        "include more surrounding lines so it occurs once")
    i = text.index(old)
    if len(old) <= 2 and old.strip() == old:  # "5" inside "db:5432": a model copying digits into an edit
        a, b = i, i + len(old)
        while a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_"):
            a -= 1
        while b < len(text) and (text[b].isalnum() or text[b] == "_"):
            b += 1
        if (a, b) != (i, i + len(old)):
            raise ToolError(f"edit_file: {old!r} is part of {text[a:b]!r} (line {_line_of(text, i)}) in {path}: "
                            "give the whole word or line as old")
    if not new and (i == 0 or text[i - 1] == "\n") and text[i + len(old) : i + len(old) + 1] == "\n":
        old += "\n"  # whole lines replaced by nothing: they go, not an empty line in their place
    after = text[:i] + new + text[i + len(old) :]
    _check_parses("edit_file", path, text, after)
    _replace(p, after)
    ctx.seen.add(path)
    line = _line_of(text, i)
    head = f"edited {path} at line {line} ({_count(len(old.splitlines()), 'line')} -> {_count(len(new.splitlines()), 'line')}){note}"
    return head + _around(after, line, len(new.splitlines()))


EDIT_CONTEXT = 2  # lines shown before and after an edit's new text
EDIT_SHOWN = 12  # most lines an edit's result shows


def _around(text: str, line: int, count: int) -> str:
    """The lines of ``text`` around lines ``line`` .. ``line + count - 1`` (an edit's new text), as read_file
    numbers them, after ``"; lines A-B now:"``: the model sees what its edit left."""
    lines = text.splitlines()
    if not lines:
        return "; the file is now empty"
    a = max(1, line - EDIT_CONTEXT)
    b = min(len(lines), line + max(count, 1) - 1 + EDIT_CONTEXT, a + EDIT_SHOWN - 1)
    rows = "\n".join(f"{k:>5}  {lines[k - 1]}" for k in range(a, b + 1))
    return f"; lines {a}-{b} now:\n{rows}"


def _line_of(text: str, i: int) -> int:
    """The 1-based line of ``text`` that character ``i`` is on."""
    return text.count("\n", 0, i) + 1


def _find_all(text: str, sub: str) -> list[int]:
    """Where ``sub`` starts in ``text``: every occurrence that ``str.count`` counts, in order."""
    at, i = [], text.find(sub)
    while i >= 0:
        at.append(i)
        i = text.find(sub, i + len(sub))
    return at


def _closest(text: str, old: str) -> str:
    """Where the file comes closest to the first line of ``old`` (``"; the closest line is 6: ..."``), or ``""``
    when no line is near (difflib's similarity ratio under 0.6)."""
    first = next((ln.strip() for ln in old.splitlines() if ln.strip()), "")
    lines = text.splitlines()
    near = difflib.get_close_matches(first, [ln.strip() for ln in lines], n=1, cutoff=0.6) if first else []
    if not near:
        return ""
    at = next(i for i, ln in enumerate(lines, 1) if ln.strip() == near[0])
    return f"; the closest line is {at}: {lines[at - 1][:200]!r}"


@tool(idempotent=True)
def search(ctx: ToolContext, pattern: str, path: str = ".", glob: str | None = None) -> str:
    """Search the workdir's text files for a regular expression; returns how many lines match in how many files, then file:line: text for each (at most 100).

    Args:
        pattern: a Python regular expression.
        path: folder or file to search, relative to the workdir.
        glob: only files whose name matches this pattern, e.g. "*.py".
    """
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ToolError(f"search: bad regular expression {pattern!r} ({exc}): escape special characters with \\") from None
    root = ctx.path(path)
    if not root.exists():
        raise ToolError(f"search: no file or folder {path!r} in the workdir")
    found = files(root, glob)
    widened = ""
    if glob and not found and root.is_dir() and (found := files(root, None)):  # a glob that names no file: search them all
        widened = f" (the glob {glob!r} matches none of the {_count(len(found), 'file')} under {ctx.relative(root)}: all were searched)"
    hits: list[str] = []
    matched, hit_files = 0, 0
    base = ctx.workdir.resolve()
    for f in found:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:4096]:
            continue  # binary
        before = matched
        for i, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if rx.search(line):
                matched += 1
                if len(hits) < SEARCH_SHOWN:
                    hits.append(f"{f.relative_to(base)}:{i}: {line.strip()[:200]}")
        hit_files += matched > before
    if not matched:
        return f"no match for {pattern!r} in {_count(len(found), 'file')}{widened}"
    # the count first: a model asked "how many" reads it rather than counting the lines itself
    head = f"{_count(matched, 'matching line')} in {_count(hit_files, 'file')}{widened}"
    if matched > len(hits):
        return f"{head} (the first {len(hits)} shown: narrow the pattern, path or glob for the rest):\n" + "\n".join(hits)
    return f"{head}:\n" + "\n".join(hits)


SEARCH_SHOWN = 100  # most matching lines one search returns (all of them are counted)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@tool
def plan(ctx: ToolContext, plan: str) -> str:
    """Write the plan: a short numbered list of the steps to take. It stays at the top of your context.

    Args:
        plan: the steps, one per numbered line.
    """
    if not plan.strip():
        raise ToolError("plan: the plan is empty: write a numbered list of steps")
    return "plan updated"


_STEP = re.compile(r"^\s*(?:\d+[.):](?!\d)|[-*\u2022])\s*\S", re.M)


def is_step_list(text: str) -> bool:
    """Whether ``text`` lists steps: a line that starts numbered (``1.``, ``2)``) or bulleted (``-``)."""
    return _STEP.search(text) is not None


@tool
def finish(ctx: ToolContext, answer: str) -> str:
    """Finish the task and give the final answer (what was done, or the value asked for).

    Args:
        answer: the value the task asked for, or a one-line summary of the change made.
    """
    return answer


RECALL_MOST = 8  # most results one recall puts back
_NOT_SEARCHED = ("recall(", "plan(")  # call signatures whose results a recall by words skips


def rank_results(results: list[tuple[str, str]], query: str, repeats: dict[int, int] | None = None) -> list[int]:
    """The numbers (1-based) of the results ``query`` matches, best first.

    ``N``, ``result N`` or ``[result N]`` names one result (a call that was not run because it repeated result
    K names K: ``repeats`` maps the one to the other). Otherwise every result whose call or text holds one
    of the query's words (case-insensitive) is ranked by those words, each weighted by how few results hold it
    (inverse document frequency), the score doubled where the whole query appears as written; on a tie the
    later result first. Results of ``recall`` itself (copies of earlier results), of ``plan`` and of calls not
    run are not searched by words: a second recall would otherwise bring back the first one's copies too.

    Raises:
        ToolError: no result yet, a number out of range, or no result with any of the words.
    """
    n = len(results)
    if not n:
        raise ToolError("recall: there is no tool result yet")
    m = re.fullmatch(r"\s*\[?\s*(?:result\s*)?#?(\d+)\s*\]?\s*", query, re.I)
    if m:
        k = int(m.group(1))
        if not 1 <= k <= n:
            raise ToolError(f"recall: there is no result {k}: the results so far are numbered 1 to {n}")
        return [(repeats or {}).get(k, k)]
    words = {w for w in re.findall(r"[\w./-]+", query.lower()) if len(w) > 1}
    if not words:
        raise ToolError(f"recall: the query {query!r} has no words: give a result's number or words it contained, e.g. a file name")
    whole = query.strip().lower()
    skip = repeats or {}
    hays = ["" if call.startswith(_NOT_SEARCHED) or i in skip else f"{call}\n{text}".lower() for i, (call, text) in enumerate(results, 1)]
    weight = {w: math.log((n + 1) / (sum(w in h for h in hays) + 0.5)) for w in words}
    scored = []
    for i, hay in enumerate(hays, 1):
        score = sum(weight[w] for w in words if w in hay) * (2 if whole in hay else 1)
        if score > 0:
            scored.append((score, i))
    if not scored:
        raise ToolError(f"recall: no earlier result holds {query!r}: try other words (a file name, a command) or a result's number")
    return [i for _, i in sorted(scored, reverse=True)]


@tool(idempotent=True)
def recall(ctx: ToolContext, query: str) -> str:
    """Show again, word for word, the earlier tool results that best match a query. Your memory of old tool results is compressed: recall them when you need their exact text.

    Args:
        query: the file name or command that gave the result, or words it contained, or its number.
    """
    ranked = rank_results(ctx.results, query, ctx.repeats)
    if len(ranked) == 1:
        return ctx.results[ranked[0] - 1][1]
    picked: list[int] = []
    used = 0
    for i in ranked:  # the best first, then as many more as fit the room one result has in the context
        size = len(ctx.results[i - 1][1]) + 16
        if picked and used + size > ctx.limit:
            continue
        picked.append(i)
        used += size
        if len(picked) == RECALL_MOST:
            break
    return "\n\n".join(f"{result_header(i)}{ctx.results[i - 1][1]}" for i in picked)


BUILTIN: tuple[Tool, ...] = (bash, python, read_file, write_file, edit_file, search, plan, finish)


@dataclass
class Toolbox:
    """The tools of a run by name (built-ins first, then the user's; a user tool may replace a built-in)."""

    tools: dict[str, Tool] = field(default_factory=dict)

    @classmethod
    def of(cls, extra: list[Tool] | tuple[Tool, ...] = (), with_recall: bool = False, with_plan: bool = True) -> Toolbox:
        """The built-ins (plus :func:`recall` when ``with_recall``, less :func:`plan` unless ``with_plan``), then ``extra``."""
        box = cls({t.name: t for t in (*BUILTIN, *((recall,) if with_recall else ())) if with_plan or t.name != "plan"})
        for t in extra:
            if not isinstance(t, Tool):
                raise LongKVError(f"{t!r} is not a tool: decorate the function with @longkv.agent.tool")
            box.tools[t.name] = t
        return box

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self.tools
