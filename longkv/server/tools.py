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
- **Grammar** (:func:`longkv.server.tool_grammar.tool_grammar`, with :func:`~longkv.server.tool_grammar.plan_reply`): llguidance Lark text. ``auto`` lets free text
  run until the model opens a call, then constrains the call to one of the tools and
  its JSON-schema arguments, laid out exactly as the template writes calls back
  (``", "`` and ``": "``, no other whitespace), so the next turn's prompt extends the
  cached tokens. ``required`` / a named function constrain the whole output.
- **Parsing** (:class:`longkv.server.tool_parser.CallParser`): one incremental parser turns generated text into
  content and tool-call deltas, for the streamed and the whole response alike, so the
  two agree byte for byte. Without the grammar it also recognises a fenced or bare
  JSON call (``{"name": ..., "arguments": ...}``), and reports calls that do not parse
  or do not fit their schema.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
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


class WrittenReplies:
    """The text of recent replies whose calls the model wrote outside the tags (bare or fenced JSON).

    The template writes an earlier call back in tags, which is not what such a reply's
    tokens were, so the prefix cache would end before it and the reply be prefilled again.
    :func:`render_messages` writes an assistant message whose calls are exactly such a
    reply's (same ids, names and arguments, no content) back as the reply's own text.
    Keeps the last ``size`` replies (a miss only costs that prefill).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._by_id: OrderedDict[str, tuple[str, str]] = OrderedDict()

    @staticmethod
    def _key(calls: list[tuple[str, str, Any]]) -> str:
        return json.dumps([[cid, name, args] for cid, name, args in calls], sort_keys=True)

    def remember(self, text: str, calls: list[tuple[str, str, Any]]) -> None:
        """``text``: the whole reply; ``calls``: its (id, name, arguments object) in order."""
        if not calls:
            return
        self._by_id[calls[0][0]] = (text, self._key(calls))
        self._by_id.move_to_end(calls[0][0])
        while len(self._by_id) > self.size:
            self._by_id.popitem(last=False)

    def text_of(self, calls: list[tuple[str, str, Any]]) -> str | None:
        """The reply's own text when ``calls`` are exactly a remembered reply's, else ``None``."""
        hit = self._by_id.get(calls[0][0]) if calls else None
        return hit[0] if hit is not None and hit[1] == self._key(calls) else None


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, fmt: ToolFormat, written: WrittenReplies | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (OpenAI shape, content already plain text) -> (template messages, template ``tools``).

    Earlier calls' ``arguments`` (JSON strings on the wire) become objects, so a template
    writes them with its own ``tojson``. Without a native template the tools and calls are
    written in the fallback format described in the module docstring. An assistant message
    whose calls ``written`` remembers as written outside the tags is the reply's own text.

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
        own = written.text_of([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]) if written and calls else None
        if own is not None and not msg["content"]:  # as the model wrote it: the prefix cache covers it
            msg["content"], calls = own, []
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

