"""Tools as typed Python functions: the JSON schema comes from the signature and the docstring.

A tool is a function ``f(ctx, **arguments) -> str`` registered with :func:`tool`;
the first parameter is the :class:`ToolContext` (workdir, sandbox), the others
are the model-facing arguments. The schema of each argument comes from its type
annotation (str, int, float, bool, list[...], dict, ``X | None``, Literal) and
its line under ``Args:`` in the docstring; the tool's description is the
docstring's first paragraph. A tool raises :class:`ToolError` for a mistake the
model can fix (the message goes back as the tool result, with its hint).
The built-in tools are in :mod:`longkv.agent.tools`.
"""

from __future__ import annotations

import glob
import inspect
import json
import re
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from longkv.agent.workdir import files
from longkv.errors import LongKVError


class ToolError(Exception):
    """A tool call the model can correct: ``str(err)`` goes back to it as the result (what went wrong + the fix)."""


@dataclass
class ToolContext:
    """What a tool call may touch: the workdir (every path argument resolves inside it), the sandbox, the run's
    tool results so far, ``(call signature, text as put in the context)`` (``results[n - 1]`` is ``[result n]``),
    the files the run has read or written (``path`` arguments as given), and how many characters of a result the
    context takes back."""

    workdir: Path
    sandbox: Any  # longkv.agent.sandbox.Sandbox
    results: list[tuple[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # write_file replaces an existing file only if it is among these
    repeats: dict[int, int] = field(default_factory=dict)  # result number of a call not run again -> the result it repeats
    limit: int = 8000  # characters of one tool result the context takes back (longer ones are cut, head + tail)

    def path(self, rel: str) -> Path:
        """``rel`` resolved inside the workdir.

        Raises:
            ToolError: the path leaves the workdir, or names a FIFO, socket or device (reading one can block for good).
        """
        p = (self.workdir / rel).resolve()
        root = self.workdir.resolve()
        if p != root and root not in p.parents:
            raise ToolError(f"{rel!r} is outside the workdir {root}: use a path relative to it")
        try:
            mode = p.stat().st_mode
        except OSError:
            return p
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise ToolError(f"{rel!r} is {kind}, not a file: the file tools read and write regular files only")
        return p

    def relative(self, p: Path) -> str:
        """``p`` (a path from :meth:`path`) as the model names it: relative to the workdir, ``.`` for the workdir."""
        return p.relative_to(self.workdir.resolve()).as_posix() or "."

    def namesakes(self, p: Path) -> list[str]:
        """Other files of the workdir named like ``p`` (a path from :meth:`path`), as the model names them, at most 3:
        a model that writes ``faq.md`` for ``docs/faq.md`` is told where the file is."""
        root = self.workdir.resolve()
        return [self.relative(f) for f in files(root, glob.escape(p.name)) if f.name == p.name and f != p][:3]

    def has_seen(self, p: Path) -> bool:
        """Whether the run has read or written the file at ``p`` (a path from :meth:`path`)."""
        return any(self.path(s) == p for s in self.seen)


@dataclass(frozen=True)
class Tool:
    """A registered tool: ``fn(ctx, **arguments) -> str`` and its OpenAI function schema."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str]
    idempotent: bool = False

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry: ``{"type": "function", "function": {name, description, parameters}}``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> str:
        """Run the tool on checked arguments.

        Raises:
            ToolError: missing, unknown or mistyped arguments, or the tool's own error.
        """
        props = self.parameters["properties"]
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolError(f"{self.name} has no argument {', '.join(map(repr, unknown))}: its arguments are {', '.join(props)}")
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            raise ToolError(f"{self.name} needs {', '.join(map(repr, missing))}")
        for k, v in arguments.items():
            _check_type(self.name, k, v, props[k])
        return self.fn(ctx, **arguments)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _json_schema(ann: Any) -> dict[str, Any]:
    """JSON schema of a Python annotation (the subset tools use)."""
    origin = get_origin(ann)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in get_args(ann) if a is not type(None)]
        if len(inner) == 1:
            return _json_schema(inner[0])
        return {"anyOf": [_json_schema(a) for a in inner]}
    if origin is Literal:
        return {"enum": list(get_args(ann))}
    if origin in (list, tuple) or ann in (list, tuple):
        args = get_args(ann)
        return {"type": "array", **({"items": _json_schema(args[0])} if args else {})}
    if origin is dict or ann is dict:
        return {"type": "object"}
    if ann in _JSON_TYPES:
        return {"type": _JSON_TYPES[ann]}
    raise LongKVError(f"a tool argument of type {ann!r} has no JSON schema: use str, int, float, bool, list, dict, Literal or X | None")


def _check_type(tool: str, name: str, value: Any, schema: dict[str, Any]) -> None:
    want = schema.get("type")
    ok = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if value is None:  # an optional argument left null
        return
    if want in ok and not ok[want](value):
        article = "an" if want in ("integer", "array", "object") else "a"
        raise ToolError(f"{tool}: argument {name!r} must be {article} {want}, got {json.dumps(value)[:60]}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"{tool}: argument {name!r} must be one of {schema['enum']}, got {value!r}")


def _doc_args(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph of a docstring and its ``Args:`` lines (``name: text``, continuation lines joined)."""
    doc = inspect.cleandoc(doc or "")
    head = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    args: dict[str, str] = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if m:
        current = None
        for line in m.group(1).splitlines():
            am = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
            if am and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = am.group(1)
                args[current] = am.group(2).strip()
            elif current:
                args[current] += " " + line.strip()
    return head, args


def tool(fn: Callable[..., str] | None = None, *, name: str | None = None, idempotent: bool = False) -> Any:
    """Make a :class:`Tool` of ``fn(ctx, **arguments) -> str`` (usable as ``@tool`` or ``@tool(idempotent=True)``).

    The first parameter receives the :class:`ToolContext`; a function without one
    (``fn(**arguments)``) is wrapped. Raises :class:`~longkv.errors.LongKVError` for an
    argument type with no JSON schema or a function without a docstring.
    """

    def make(f: Callable[..., str]) -> Tool:
        if not f.__doc__:
            raise LongKVError(f"tool {f.__name__} has no docstring: its first paragraph is what the model reads")
        head, arg_docs = _doc_args(f.__doc__)
        try:
            hints = typing.get_type_hints(f)
        except (NameError, TypeError) as exc:  # an annotation written as a string that names nothing importable here
            raise LongKVError(f"tool {f.__name__}: an argument's type annotation cannot be read ({exc}): annotate with "
                              "str, int, float, bool, list, dict, Literal or X | None, imported where the tool is defined") from None
        params = list(inspect.signature(f).parameters.values())
        takes_ctx = bool(params) and (params[0].name == "ctx" or hints.get(params[0].name) is ToolContext)
        props: dict[str, Any] = {}
        required = []
        for p in params[1:] if takes_ctx else params:
            s = _json_schema(hints.get(p.name, str))
            if p.name in arg_docs:
                s["description"] = arg_docs[p.name]
            props[p.name] = s
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        call = f if takes_ctx else (lambda ctx, **kw: f(**kw))
        return Tool(name or f.__name__, head, schema, call, idempotent)

    return make(fn) if fn is not None else make
