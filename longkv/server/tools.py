"""OpenAI tool calls on top of a chat template: rendering, grammars and a streaming parser.

The wire format of a call is Hermes-style, the one the Qwen2.5 templates teach
their models::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- **Rendering** (:func:`render_messages`): a template that knows tools (it reads
  ``tools``) renders them and every earlier call itself. A template that does not
  (SmolLM2's) gets longkv's fallback: the tools listed in the system message, earlier
  calls written into the assistant turn in the same format the model is asked to
  produce, results as ``<tool_response>`` blocks in a user turn. Either way the model
  never sees its own calls written two ways, and a history re-renders byte for byte.
- **Grammar** (:func:`tool_grammar`): llguidance Lark text. ``auto`` lets free text
  run until the model opens a call, then constrains the call to one of the tools and
  its JSON-schema arguments, laid out exactly as the template writes calls back
  (``", "`` and ``": "``, no other whitespace), so the next turn's prompt extends the
  cached tokens. ``required`` / a named function constrain the whole output.
- **Parsing** (:class:`CallParser`): one incremental parser turns generated text into
  content and tool-call deltas, for the streamed and the whole response alike, so the
  two agree byte for byte. Without the grammar it also recognises a fenced or bare
  JSON call (``{"name": ..., "arguments": ...}``), and reports calls that do not parse
  or do not fit their schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from longkv.server.errors import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
FALLBACK_PROMPT = (
    "You can call functions to help with the user's request. Their signatures, as JSON, are between <tools> and </tools>:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments between <tool_call> and </tool_call>:\n"
    '<tool_call>\n{{"name": "function_name", "arguments": {{"arg": "value"}}}}\n</tool_call>\n'
    "Results come back between <tool_response> and </tool_response>."
)


# --------------------------------------------------------------------------- format and validation


@dataclass(frozen=True)
class ToolFormat:
    """How one tokenizer writes calls.

    Attributes:
        native: the chat template renders ``tools`` and earlier calls itself.
        open_id, close_id: the token ids of ``<tool_call>`` / ``</tool_call>`` when each is one
            special token (Qwen2.5), else ``None`` (the tags are plain text).
    """

    native: bool
    open_id: int | None = None
    close_id: int | None = None


def tool_format(tokenizer: Any) -> ToolFormat:
    """The tool-call format of ``tokenizer`` (its chat template and added tokens)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    native = isinstance(template, str) and "tools" in template and "tool_call" in template

    def single(tag: str) -> int | None:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and ids[0] in getattr(tokenizer, "added_tokens_decoder", {}) else None

    return ToolFormat(native, single(OPEN), single(CLOSE))


def check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Validate OpenAI function tools; returns name -> parameters schema.

    Raises:
        ApiError: (400) a tool that is not a function, a bad or repeated name, parameters that
            are not a JSON Schema object; the message names the field.
    """
    from jsonschema import exceptions, validators

    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool["function"]
        name = fn["name"]
        if not NAME_RE.match(name):
            raise ApiError(400, f"tools[{i}].function.name {name!r} is not a valid name: use 1-64 letters, digits, _ or -", param=f"tools[{i}].function.name")
        if name in schemas:
            raise ApiError(400, f"tools[{i}].function.name {name!r} is used twice: give each tool its own name", param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        try:
            validators.validator_for(params).check_schema(params)
        except exceptions.SchemaError as exc:
            raise ApiError(400, f"tools[{i}].function.parameters is not a valid JSON Schema: {exc.message}", param=f"tools[{i}].function.parameters") from None
        if params.get("type", "object") != "object":
            raise ApiError(400, f"tools[{i}].function.parameters must describe an object (\"type\": \"object\"), got {params.get('type')!r}", param=f"tools[{i}].function.parameters")
        schemas[name] = params
    return schemas


def check_arguments(schema: dict[str, Any], arguments: Any) -> str | None:
    """Why ``arguments`` do not fit ``schema`` (one line), or ``None`` when they do."""
    from jsonschema import validators

    errors = sorted(validators.validator_for(schema)(schema).iter_errors(arguments), key=lambda e: list(e.path))
    if not errors:
        return None
    e = errors[0]
    where = "/".join(str(p) for p in e.path)
    return f"{where + ': ' if where else ''}{e.message}"


# --------------------------------------------------------------------------- rendering


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, fmt: ToolFormat
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (OpenAI shape, content already plain text) -> (template messages, template ``tools``).

    Earlier calls' ``arguments`` (JSON strings on the wire) become objects, so a template
    writes them with its own ``tojson``. Without a native template the tools and calls are
    written in the fallback format described in the module docstring.

    Raises:
        ApiError: (400) an earlier call whose arguments are not a JSON object.
    """
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call["function"]
            try:
                args = json.loads(fn["arguments"]) if fn["arguments"] else {}
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON ({exc.msg}): send the arguments as a JSON object string", param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
            if not isinstance(args, dict):
                raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object", param=f"messages[{i}].tool_calls[{j}].function.arguments")
            calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if calls:
            msg["tool_calls"] = calls
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    if fmt.native:
        return out, tools or None
    return _fallback(out, tools), None


def write_call(name: str, arguments: dict[str, Any]) -> str:
    """One call as the grammar lays it out (and as the fallback renders history)."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def _fallback(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools, calls and results written as plain text, for a template without tool support."""
    out: list[dict[str, Any]] = []
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = FALLBACK_PROMPT.format(tools=listed)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m["content"] else []) + [write_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    for m in out:
        m.pop("_results", None)
    return out


# --------------------------------------------------------------------------- grammar


def _lit(text: str) -> str:
    return json.dumps(text)


_NAME_CHAR = r'[^"\\\x00-\x1f]'  # a character of a JSON string without escapes


def _none_of(names: list[str]) -> str:
    """A regex (anchored) of the non-empty strings of :data:`_NAME_CHAR` that are none of ``names`` (their trie's
    complement: llguidance's regexes have no lookahead, and its JSON schemas no ``not``)."""
    trie: dict[str, Any] = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[""] = {}

    def rest(node: dict[str, Any], depth: int) -> str:
        kids = sorted(k for k in node if k)
        other = _NAME_CHAR if not kids else "[^" + "".join(re.escape(k) for k in kids) + _NAME_CHAR[2:]
        alts = [f"{other}{_NAME_CHAR}*"] + [f"{re.escape(k)}{rest(node[k], depth + 1)}" for k in kids]
        body = "(?:" + "|".join(alts) + ")"
        return body + "?" if depth and "" not in node else body  # a prefix that is no name may end here

    return "^" + rest(trie, 0) + "$"


def tool_grammar(
    schemas: dict[str, dict[str, Any]],
    choice: str,
    parallel: bool,
    fmt: ToolFormat,
    answer_schema: dict[str, Any] | None = None,
) -> str:
    """The llguidance Lark grammar of a reply.

    Args:
        schemas: tool name -> parameters schema (from :func:`check_tools`); the tools allowed.
            An object schema with ``properties`` and no ``additionalProperties`` gets
            ``additionalProperties: false`` here: a call cannot invent arguments.
        choice: ``"auto"`` (free text, or text then calls), ``"required"`` (calls only) or
            ``"none"`` (text only; with a special-token trigger the call token is banned).
        parallel: more than one call in a reply.
        fmt: the tokenizer's format (special-token tags or plain text).
        answer_schema: a ``response_format`` schema the text answer must follow (no free text).

    Under ``auto``, free text may not open with a JSON object (bare or in a json code
    fence): small models often write a call that way instead of in tags, so such a reply
    is held to the call schemas too and parsed as a call.
    """
    open_tok = f"<[{fmt.open_id}]>" if fmt.open_id is not None else _lit(OPEN)
    close_tok = f"<[{fmt.close_id}]>" if fmt.close_id is not None else _lit(CLOSE)
    rules = []
    if answer_schema is not None:
        rules.append(f"answer: %json {json.dumps(answer_schema)}")
    if choice == "none":
        return "\n".join(["start: answer" if answer_schema is not None else "start: TEXT", "TEXT: /(.|\\n)+/", *rules]) + "\n"
    closed = {name: _closed(params) for name, params in schemas.items()}
    bodies = []
    for i, (name, params) in enumerate(closed.items()):
        rules.append(f"args{i}: %json {json.dumps({**params, 'x-guidance': JSON_LAYOUT})}")
        head = "\n{" + json.dumps("name") + ": " + json.dumps(name) + ", " + json.dumps("arguments") + ": "
        bodies.append(f"{_lit(head)} args{i} {_lit('}' + chr(10))} {close_tok}")
    rules.append("body: " + " | ".join(bodies))
    # after a call: another one, or the end (a newline may come first: models write one after a call, and
    # the engine ends the reply where the model would go on with text the grammar forbids)
    more = f'("\\n" {open_tok} body)* "\\n"?' if parallel else ""
    if choice == "required":
        return "\n".join([f"start: {open_tok} body {more}", *rules]) + "\n"
    # auto. Text may not open with a JSON object, bare or in a json fence: small models often write a
    # call that way instead of in tags, so such a reply is held to the call schemas too (and parsed as one).
    text = "([^{`]|`[^`]|``[^`]|```[^j]|```j[^s]|```js[^o]|```jso[^n]|```json[^\\n]|```json\\n[^{\\[])(.|\\n)*"
    if fmt.open_id is not None:  # the tag is a special token, which text cannot contain
        first = f"TEXT? {open_tok}"
    else:  # a plain-text tag ends the text lazily: text cannot hold the tag without opening a call
        first = "head"
        rules.append(f"head[lazy]: /({text})?{re.escape(OPEN)}/")
    if answer_schema is not None:  # the reply is the JSON answer or calls: no free text before a call either
        first = open_tok
        return "\n".join(["start: answer | calls", f"calls: {first} body {more}", *rules]) + "\n"
    objects = [{"type": "object", "properties": {"name": {"const": n}, "arguments": p}, "required": ["name", "arguments"], "additionalProperties": False} for n, p in closed.items()]
    # a JSON object naming no tool stays possible, and is text: the model answering "tell me a joke" with a made-up
    # {"name": "short_joke", ...} is not pushed into a real tool's call (with its side effects)
    objects.append({"type": "object", "properties": {"name": {"type": "string", "pattern": _none_of(list(closed))}, "arguments": {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
    rules += [f"TEXT: /{text}/", f"object: %json {json.dumps({'anyOf': objects})}"]
    if parallel:  # several fenced blocks, or a list in one
        rules.append(f"objects: %json {json.dumps({'type': 'array', 'items': {'anyOf': objects}, 'minItems': 1})}")
        rules += ['fenced: "```json\\n" (object | objects) "\\n```"', 'json_calls: object | fenced (/\\n+/ fenced)* /\\n+/?']
    else:
        rules += ['fenced: "```json\\n" object "\\n```"', "json_calls: object | fenced"]
    return "\n".join(["start: TEXT | calls | json_calls", f"calls: ({first}) body {more}", *rules]) + "\n"


def _unsupported(schema: dict[str, Any]) -> str | None:
    """Why llguidance cannot compile ``schema`` (its first line), or ``None``."""
    from llguidance import LLMatcher

    try:
        err = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except Exception as exc:  # a schema it cannot even read
        err = str(exc) or type(exc).__name__
    return err.strip().splitlines()[0][:300] if err and err.strip() else None


def _closed(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``additionalProperties: false`` when it lists properties and says nothing of others."""
    if "properties" in params and "additionalProperties" not in params:
        return {**params, "additionalProperties": False}
    return params


# --------------------------------------------------------------------------- one reply's plan


@dataclass
class ReplyPlan:
    """What a chat request asks of the reply.

    Attributes:
        tools: the request's tools (OpenAI dicts), handed to the template; ``None``: no tools.
        schemas: tool name -> parameters schema of the tools the reply may call.
        choice: ``"none"``, ``"auto"`` or ``"required"`` (a named function is ``required``
            with only that tool in ``schemas``; ``allowed_tools`` is its mode with only those tools in
            ``schemas``, all of them still in ``tools``).
        parallel: more than one call per reply.
        grammar: the Lark grammar constraining the reply (``None``: unconstrained).
        answer_schema: the JSON schema a text answer follows (``response_format``).
    """

    tools: list[dict[str, Any]] | None
    schemas: dict[str, dict[str, Any]]
    choice: str
    parallel: bool
    grammar: str | None
    answer_schema: dict[str, Any] | None

    @property
    def calls(self) -> bool:
        """The reply may hold calls (they are parsed out of the text)."""
        return bool(self.schemas) and self.choice != "none"

    def parser(self) -> CallParser | None:
        """A fresh parser for this reply, or ``None`` when it cannot hold calls."""
        if not self.calls:
            return None
        return CallParser(self.schemas, streaming_args=self.grammar is not None, lenient=True)


def plan_reply(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    response_format: dict[str, Any] | None,
    use_grammar: bool,
    fmt: ToolFormat,
) -> ReplyPlan:
    """Check the tool and format fields of a chat request and build its :class:`ReplyPlan`.

    Raises:
        ApiError: (400, naming the field) bad tools, a ``tool_choice`` without tools or naming
            an unknown tool, a ``json_schema`` format without a valid schema.
    """
    schemas = check_tools(tools) if tools else {}
    if tool_choice not in (None, "none", "auto") and not tools:
        raise ApiError(400, "tool_choice required, a named function or allowed_tools needs tools: send the tools the model may call", param="tool_choice")
    choice = "auto" if tool_choice is None else tool_choice
    parallel = parallel_tool_calls is not False
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice["allowed_tools"]
        names = [t["function"]["name"] for t in allowed["tools"]]
        for i, name in enumerate(names):
            if name not in schemas:
                raise ApiError(400, f"tool_choice.allowed_tools names {name!r}, which is not among the tools ({', '.join(schemas)})",
                               param=f"tool_choice.allowed_tools.tools[{i}]")  # fmt: skip
        schemas, choice = {name: schemas[name] for name in names}, allowed["mode"]
    elif isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in schemas:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(schemas)})", param="tool_choice")
        schemas, choice, parallel = {name: schemas[name]}, "required", False
    answer: dict[str, Any] | None = None
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        answer = {"type": "object"}
    elif kind == "json_schema":
        spec = (response_format or {}).get("json_schema") or {}
        answer = spec.get("schema")
        if not isinstance(answer, dict):
            raise ApiError(400, "response_format json_schema needs a schema: send {'name': ..., 'schema': {...}}", param="response_format.json_schema.schema")
        from jsonschema import exceptions, validators

        try:
            validators.validator_for(answer).check_schema(answer)
        except exceptions.SchemaError as exc:
            raise ApiError(400, f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}", param="response_format.json_schema.schema") from None
    if answer is not None:
        answer = {**answer, "x-guidance": JSON_LAYOUT}
    grammar = None
    if use_grammar:  # schemas the grammar cannot express: a 400 naming the schema, not the grammar's text
        named = {name: i for i, name in enumerate(t["function"]["name"] for t in tools or [])}
        for name, params in schemas.items():
            why = _unsupported(_closed(params))
            if why:
                param = f"tools[{named[name]}].function.parameters"
                raise ApiError(400, f"{param} cannot be enforced by the grammar ({why}): simplify the schema, or send \"longkv\": {{\"grammar\": false}}", param=param)
        why = _unsupported(answer) if answer is not None else None
        if why:
            param = "response_format.json_schema.schema"
            raise ApiError(400, f"{param} cannot be enforced by the grammar ({why}): simplify the schema, or send \"longkv\": {{\"grammar\": false}}", param=param)
        if schemas and choice != "none":
            grammar = tool_grammar(schemas, str(choice), parallel, fmt, answer)
        elif answer is not None:
            grammar = f"start: %json {json.dumps(answer)}\n"
        elif schemas and fmt.open_id is not None:  # "none": the call token is banned
            grammar = tool_grammar(schemas, "none", parallel, fmt)
    return ReplyPlan(tools or None, schemas, str(choice), parallel, grammar, answer)


# --------------------------------------------------------------------------- parsing


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
    """

    content: str | None = None
    calls: list[Call] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    truncated: dict[str, Any] | None = None
    recovered: int = 0


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
        otherwise it is an error, and its text content when none of it went out.
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
            else:
                self.result.errors.append({"index": self._index, "error": f"the call was not closed with {CLOSE}", "text": raw})
                if self._header is None:
                    out.append(Delta(content=OPEN + raw))
        elif self._buf:
            held, self._buf = self._buf, ""
            if self._after_call and not held.strip():
                pass  # the newline between calls, with no call after it
            elif truncated and held.strip() and OPEN.startswith(held.strip()):  # the tag of a call, cut off
                self.result.truncated = {"index": self._index, "name": None, "arguments": None, "text": held}
            elif not (self._holding_json and self._recover(held, out)):
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
