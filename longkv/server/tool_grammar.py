"""A chat request's reply plan: its tool and format fields checked, and the grammar that holds the reply to them.

:func:`plan_reply` reads ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
``response_format`` into a :class:`ReplyPlan`; :func:`tool_grammar` writes the
llguidance Lark grammar of a reply: calls laid out exactly as the template writes
them back (:mod:`longkv.server.tools`), free text where ``auto`` allows it, and a
JSON object that names no tool kept as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from longkv.server.errors import ApiError
from longkv.server.tool_parser import CallParser
from longkv.server.tools import CLOSE, JSON_LAYOUT, OPEN, ToolFormat, check_tools


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
            An object schema with ``properties`` and no ``additionalProperties``, at any
            depth, gets ``additionalProperties: false`` here: a call cannot invent arguments.
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


_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems")  # lists of schemas (allOf apart: see _closed)
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")  # one schema


def _closed(schema: Any, close: bool = True) -> Any:
    """``schema`` with ``additionalProperties: false`` in every object schema, at any depth, that lists
    ``properties`` and says nothing of other keys (nor of ``unevaluatedProperties``): a call cannot invent
    arguments, nested ones included. The members of an ``allOf`` are not closed themselves (each would
    refuse the keys the others add), their own sub-schemas are. ``uniqueItems`` is left out (the grammar
    cannot express it, and Pydantic writes it for every ``set`` field): a call that repeats an item is
    reported by the parser, which checks the tool's own schema. A copy; ``schema`` is not changed."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "uniqueItems"}
    for key in _SUB_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SUB_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_closed(sub, close=False) for sub in out["allOf"]]
    for key in _SUB_ONE:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    if isinstance(out.get("items"), list):  # draft 4-7 tuple form
        out["items"] = [_closed(sub) for sub in out["items"]]
    if close and "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


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
        answer = {**_closed(answer), "x-guidance": JSON_LAYOUT}  # closed as tool arguments are: no invented keys
    grammar = None
    if use_grammar:  # schemas the grammar cannot express: a 400 naming the schema, not the grammar's text
        named = {name: i for i, name in enumerate(t["function"]["name"] for t in tools or [])}
        for name, params in schemas.items() if choice != "none" else ():  # "none" compiles no schema
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
