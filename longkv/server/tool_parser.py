"""Tool calls out of generated text: one incremental parser for streamed and whole replies.

:class:`CallParser` turns the text a model generates into content and tool-call
deltas (the wire format of :mod:`longkv.server.tools`), so a streamed response and
a whole one agree byte for byte. Without the grammar it also recognises a fenced or
bare JSON call (``{"name": ..., "arguments": ...}``) and reports calls that do not
parse or do not fit their schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from longkv.server.tools import CLOSE, OPEN, check_arguments


@dataclass
class Call:
    """A tool call as it is returned (``arguments``: a JSON text)."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class Delta:
    """One piece of the reply: ``content`` text, or a call's start (``name``) or ``arguments`` text."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class ParseResult:
    """What a whole reply held.

    Attributes:
        content: the text outside calls (``None`` when there is none).
        calls: complete calls, in order.
        errors: ``{"index", "error", "text"}`` for calls that did not parse or fit their schema.
        truncated: the call cut off by ``max_tokens`` (``{"index", "name", "arguments"}``), if any.
        recovered: calls recognised outside ``<tool_call>`` tags (a fenced or bare JSON call).
        text: the reply as generated (everything fed).
    """

    content: str | None = None
    calls: list[Call] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    truncated: dict[str, Any] | None = None
    recovered: int = 0
    text: str = ""


_HEADER = re.compile(r'\s*\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class CallParser:
    """Generated text in, content and tool-call deltas out (streamed and whole replies alike).

    Args:
        schemas: tool name -> parameters schema; calls are checked against them.
        streaming_args: a call's arguments go out as they are generated (only under the
            grammar, which fixes the call's layout); otherwise each call goes out whole once
            it has closed and been checked.
        lenient: recognise a reply that is a fenced or bare JSON call (grammar off).

    Feed it text with :meth:`feed`, then call :meth:`finish`; :attr:`result` holds the
    reply folded from exactly the deltas returned.
    """

    def __init__(self, schemas: dict[str, dict[str, Any]], streaming_args: bool, lenient: bool) -> None:
        self.schemas, self.streaming_args, self.lenient = schemas, streaming_args, lenient
        self.result = ParseResult()
        self._buf = ""
        self._in_call = False
        self._raw_call = ""  # text of the open call so far (after <tool_call>)
        self._header: tuple[str, int] | None = None  # (name, end of header) once the call's start went out
        self._sent_args = 0  # characters of the open call's arguments already out
        self._index = 0  # index of the next call
        self._content_out = False  # some content went out
        self._holding_json = False  # a possible bare/fenced JSON call is held back to the end
        self._after_call = False  # the text so far ends with a call: whitespace here separates calls

    # -- public
    def feed(self, text: str) -> list[Delta]:
        """Deltas for the next piece of generated text."""
        self.result.text += text
        self._buf += text
        out: list[Delta] = []
        while True:
            if self._in_call:
                if not self._step_call(out):
                    break
            elif not self._step_text(out):
                break
        return self._fold(out)

    def finish(self, truncated: bool = False) -> list[Delta]:
        """Deltas for what was held back; ``truncated``: generation stopped at ``max_tokens``.

        A call still open is not a call: cut off by ``max_tokens`` it goes to
        ``result.truncated`` (its streamed start and arguments, if any, were already out);
        otherwise it is an error (not among the calls), and its text content when none of it
        went out. A held bare or fenced JSON call of a known tool that does not parse is the
        same, and never content.
        """
        out: list[Delta] = []
        if self._in_call:
            raw = self._raw_call + self._buf
            self._buf = ""
            if truncated:
                name: str | None = None
                args: str | None = None
                if self._header is not None:
                    self.result.calls.pop()  # its start (and part of its arguments) went out already
                    name, args = self._header[0], raw[self._header[1] :]
                    args = args[: len(args) - _held_prefix(args, "}\n" + CLOSE)]
                else:
                    m = re.match(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"', raw)
                    name = m.group(1) if m else None
                self.result.truncated = {"index": self._index, "name": name, "arguments": args, "text": raw}
            else:  # ended inside the call (a stop string): not a call, whatever of it went out
                self.result.errors.append({"index": self._index, "error": f"the call was not closed with {CLOSE}", "text": raw})
                if self._header is not None:
                    self.result.calls.pop()
                else:
                    out.append(Delta(content=OPEN + raw))
        elif self._buf:
            held, self._buf = self._buf, ""
            if self._after_call and not held.strip():
                pass  # the newline between calls, with no call after it
            elif truncated and held.strip() and OPEN.startswith(held.strip()):  # the tag of a call, cut off
                self.result.truncated = {"index": self._index, "name": None, "arguments": None, "text": held}
            elif not (self._holding_json and (self._recover(held, out) or self._cut_call(held, truncated))):
                out.append(Delta(content=held))
        return self._fold(out)

    # -- text outside calls
    def _step_text(self, out: list[Delta]) -> bool:
        buf = self._buf
        if self._after_call:  # whitespace between calls is not content
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            self._after_call = False
        k = buf.find(OPEN)
        if k >= 0:
            before = buf[:k].rstrip()  # the template writes content, a newline, then the call
            if before:
                out.append(Delta(content=before))
            self._holding_json = False
            self._buf = buf[k + len(OPEN) :]
            self._in_call, self._raw_call, self._header, self._sent_args = True, "", None, 0
            return True
        if self.lenient and not self._content_out and self.result.calls == [] and buf.lstrip()[:1] in ("{", "[", "`"):
            self._holding_json = True
        if self._holding_json:
            return False
        keep = _held_prefix(buf, OPEN)
        ready = buf[: len(buf) - keep]
        stripped = ready.rstrip()
        hold = len(buf) - len(stripped)  # trailing whitespace waits: it is dropped before a call
        if stripped:
            out.append(Delta(content=stripped))
        self._buf = buf[len(buf) - hold :]
        return False

    # -- inside <tool_call> ... </tool_call>
    def _step_call(self, out: list[Delta]) -> bool:
        self._raw_call += self._buf
        self._buf = ""
        raw = self._raw_call
        c = raw.find(CLOSE)
        body = raw if c < 0 else raw[:c]
        if self.streaming_args and self._header is None:
            m = _HEADER.match(body)
            if m:
                self._header = (m.group(1), m.end())
                out.append(Delta(index=self._index, id=_new_id(), name=m.group(1), arguments=""))
        if c < 0:
            if self._header is not None:
                args = body[self._header[1] :]
                tail = args[: len(args) - _held_prefix(args, "}\n" + CLOSE)]  # the call object's "}" and tag wait
                if len(tail) > self._sent_args:
                    out.append(Delta(index=self._index, arguments=tail[self._sent_args :]))
                    self._sent_args = len(tail)
            return False
        self._buf = raw[c + len(CLOSE) :]
        self._in_call, self._after_call = False, True
        self._close_call(body, out)
        return True

    def _close_call(self, body: str, out: list[Delta]) -> None:
        index = self._index
        if self._header is not None:  # streamed: the rest of the arguments, then checked
            name = self._header[0]
            args = body[self._header[1] :].rstrip()
            args = args[:-1] if args.endswith("}") else args
            if len(args) > self._sent_args:
                out.append(Delta(index=index, arguments=args[self._sent_args :]))
            self._index += 1
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as exc:
                self.result.errors.append({"index": index, "error": f"arguments are not JSON: {exc.msg}", "text": body})
                return
            self._check(index, name, parsed, body)
            return
        call = _loads_call(body)
        if call is None:
            self.result.errors.append({"index": index, "error": 'the call is not a JSON object {"name": ..., "arguments": {...}}', "text": body})
            out.append(Delta(content=f"{OPEN}{body}{CLOSE}"))
            return
        name, args_obj = call
        self._index += 1
        out.append(Delta(index=index, id=_new_id(), name=name, arguments=json.dumps(args_obj, ensure_ascii=False)))
        self._check(index, name, args_obj, body)

    def _check(self, index: int, name: str, args: Any, text: str) -> None:
        if name not in self.schemas:
            self.result.errors.append({"index": index, "error": f"unknown tool {name!r}", "text": text})
            return
        why = check_arguments(self.schemas[name], args)
        if why is not None:
            self.result.errors.append({"index": index, "error": f"arguments do not fit the schema of {name}: {why}", "text": text})

    def _cut_call(self, text: str, truncated: bool) -> bool:
        """A held JSON reply that opens a call of one of the tools but ends before its JSON does (cut by
        ``max_tokens``, or by a stop string) is that call cut off, not content: ``result.truncated`` when
        ``truncated``, else an error."""
        m = re.match(r'\s*(?:```(?:json)?\s*)?\[?\s*\{\s*"name"\s*:\s*"([^"\\]*)"', text)
        if m is None or m.group(1) not in self.schemas:
            return False
        if truncated:
            self.result.truncated = {"index": self._index, "name": m.group(1), "arguments": None, "text": text}
        else:
            self.result.errors.append({"index": self._index, "error": "the call ends before its JSON does (a stop string?)", "text": text})
        return True

    def _recover(self, text: str, out: list[Delta]) -> bool:
        """A reply that is only JSON calls -> calls: one object, a list, or fenced blocks of either."""
        s = text.strip()
        blocks = re.findall(r"```(?:json)?\s*(.*?)\s*```", s, re.S)
        if blocks and re.sub(r"```(?:json)?\s*(.*?)\s*```", "", s, flags=re.S).strip():
            return False  # text beside the blocks: an answer that shows code
        items: list[Any] = []
        try:
            for block in blocks or [s]:
                value = json.loads(block)
                items.extend(value if isinstance(value, list) else [value])
        except json.JSONDecodeError:
            return False
        calls = [_call_of(v) for v in items]
        if not items or any(c is None or c[0] not in self.schemas for c in calls):
            return False
        for c in calls:
            assert c is not None
            index, self._index = self._index, self._index + 1
            out.append(Delta(index=index, id=_new_id(), name=c[0], arguments=json.dumps(c[1], ensure_ascii=False)))
            self._check(index, c[0], c[1], text)
        self.result.recovered += len(calls)
        return True

    # -- folding deltas into the result
    def _fold(self, deltas: list[Delta]) -> list[Delta]:
        r = self.result
        for d in deltas:
            if d.content is not None:
                r.content = (r.content or "") + d.content
                self._content_out = True
            elif d.name is not None:
                assert d.id is not None
                r.calls.append(Call(d.id, d.name, d.arguments or ""))
            else:
                r.calls[-1].arguments += d.arguments or ""
        return deltas


def _call_of(value: Any) -> tuple[str, dict[str, Any]] | None:
    """``{"name": str, "arguments" | "parameters": object or JSON text}`` -> (name, arguments)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    return (value["name"], args) if isinstance(args, dict) else None


def _loads_call(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        return _call_of(json.loads(body))
    except json.JSONDecodeError:
        return None
