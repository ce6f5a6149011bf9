"""Tool calls and structured output: the parser, the grammars, and `longkv serve` with the official client.

Unit tests need nothing; grammar tests use the real tokenizers (Qwen2.5-Coder: the
call tags are special tokens; SmolLM2: plain text, no tool support in its template);
the end-to-end tests run the real Qwen2.5-Coder-0.5B behind ``longkv serve``.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from longkv.engine.grammar import Grammar, _apply_bits, grammar_tokenizer
from longkv.server.errors import ApiError
from longkv.server.tool_grammar import plan_reply, tool_grammar
from longkv.server.tool_parser import CallParser
from longkv.server.tools import ToolFormat, render_messages, tool_format, write_call

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QWEN_ID = "qwen2.5-coder-0.5b"

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
EVENT = {  # nested arguments
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "when": {"type": "object", "properties": {"day": {"type": "integer"}, "month": {"type": "string"}}, "required": ["day", "month"]},
        "guests": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "when", "guests"],
}
SCHEMAS = {"get_weather": WEATHER, "create_event": EVENT, "list_files": {"type": "object", "properties": {}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "create_event", "description": "Put an event in the calendar", "parameters": EVENT}},
    {"type": "function", "function": {"name": "list_files", "description": "List the files of the working directory", "parameters": SCHEMAS["list_files"]}},
]


def model_path(name: str) -> str:
    getter = SHARED / "models" / "get-model"
    if not getter.exists():
        pytest.skip(f"../shared/models/get-model is absent: the real {name} is needed")
    proc = subprocess.run([str(getter), name], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not fetch {name}: {proc.stderr.strip()[-200:]}")
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- parser (no model)

REPLIES = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京 \\"Tokyo\\" }"}}\n</tool_call>',
    '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "create_event", "arguments": '
    '{"title": "Lunch", "when": {"day": 3, "month": "May"}, "guests": ["Ana", "李"]}}\n</tool_call>\n',
    "Just an answer, with trailing space  \n",
    '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Rome"}\n}\n```',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```\n\n```json\n[{"name": "list_files", "arguments": {}}]\n```',
]


@pytest.mark.parametrize("streaming_args", [True, False])
@pytest.mark.parametrize("reply", REPLIES)
def test_parser_gives_the_same_reply_whatever_the_chunking(reply: str, streaming_args: bool) -> None:
    whole = CallParser(SCHEMAS, streaming_args, lenient=True)
    whole.feed(reply)
    whole.finish()
    rng = random.Random(0)
    for _ in range(20):
        p = CallParser(SCHEMAS, streaming_args, lenient=True)
        i = 0
        while i < len(reply):
            n = rng.randint(1, 6)
            p.feed(reply[i : i + n])
            i += n
        p.finish()
        assert p.result.content == whole.result.content
        assert [(c.name, c.arguments) for c in p.result.calls] == [(c.name, c.arguments) for c in whole.result.calls]
        assert p.result.errors == whole.result.errors == []


def test_parser_reads_content_and_calls() -> None:
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
    p.feed(REPLIES[0])
    p.finish()
    assert p.result.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in p.result.calls] == [("get_weather", {"city": '東京 "Tokyo" }'})]
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
    p.feed(REPLIES[1])
    p.finish()
    assert p.result.content is None
    assert [c.name for c in p.result.calls] == ["list_files", "create_event"]
    assert p.result.calls[0].arguments == "{}"  # a call without arguments keeps its {}
    assert json.loads(p.result.calls[1].arguments)["guests"] == ["Ana", "李"]


def test_parser_recovers_fenced_and_bare_json_calls() -> None:
    for reply, args in ((REPLIES[3], {"city": "Rome"}), (REPLIES[4], {"city": "Oslo"})):
        p = CallParser(SCHEMAS, streaming_args=False, lenient=True)
        p.feed(reply)
        p.finish()
        assert p.result.content is None and p.result.recovered == 1
        assert [(c.name, json.loads(c.arguments)) for c in p.result.calls] == [("get_weather", args)]
    p = CallParser(SCHEMAS, streaming_args=False, lenient=True)  # parallel: two fenced blocks (the second a list)
    p.feed(REPLIES[5])
    p.finish()
    assert [(c.name, c.arguments) for c in p.result.calls] == [("get_weather", '{"city": "Rome"}'), ("list_files", "{}")]
    p = CallParser(SCHEMAS, streaming_args=False, lenient=True)  # code shown beside text is an answer
    p.feed("Like this:\n" + REPLIES[3])
    p.finish()
    assert p.result.calls == [] and p.result.content == "Like this:\n" + REPLIES[3]
    p = CallParser(SCHEMAS, streaming_args=False, lenient=False)  # not lenient: it stays text
    p.feed(REPLIES[3])
    p.finish()
    assert p.result.content == REPLIES[3] and p.result.calls == []


def test_parser_reports_calls_that_do_not_fit() -> None:
    p = CallParser(SCHEMAS, streaming_args=False, lenient=True)
    p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "fly", "arguments": {}}\n</tool_call>')
    p.finish()
    assert [c.name for c in p.result.calls] == ["get_weather", "fly"]
    assert [e["index"] for e in p.result.errors] == [0, 1]
    assert "'city' is a required property" in p.result.errors[0]["error"]
    assert p.result.errors[1]["error"] == "unknown tool 'fly'"
    p = CallParser(SCHEMAS, streaming_args=False, lenient=True)
    p.feed("<tool_call>\nnot json\n</tool_call>")
    p.finish()
    assert p.result.calls == [] and p.result.content == "<tool_call>\nnot json\n</tool_call>"
    assert "not a JSON object" in p.result.errors[0]["error"]


def test_a_call_cut_off_is_flagged_not_returned() -> None:
    for streaming in (True, False):
        p = CallParser(SCHEMAS, streaming_args=streaming, lenient=True)
        p.feed('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
        p.finish(truncated=True)
        assert p.result.content == "Sure." and p.result.calls == []
        assert p.result.truncated is not None and p.result.truncated["index"] == 0
        assert p.result.truncated["name"] == "get_weather"
        assert p.result.truncated["arguments"] == ('{"city": "Pa' if streaming else None)
    # complete arguments, only the tag cut off: the arguments are whole
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
    p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</')
    p.finish(truncated=True)
    assert p.result.truncated is not None and p.result.truncated["arguments"] == '{"city": "Paris"}'
    # cut off right at the start of a second call's tag: flagged, not content
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
    p.feed('<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\n<')
    p.finish(truncated=True)
    assert p.result.content is None and [c.name for c in p.result.calls] == ["list_files"]
    assert p.result.truncated is not None and p.result.truncated["index"] == 1


def test_a_json_call_cut_off_is_a_result_not_content() -> None:
    """A fenced or bare JSON call cut off by max_tokens is truncated_tool_call; cut by a stop string, an error;
    neither is content. A JSON object that names no tool stays text."""
    cut = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "'
    for truncated in (True, False):
        for text in (cut, cut[len("```json\n"):]):
            p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
            p.feed(text)
            p.finish(truncated=truncated)
            assert p.result.content is None and p.result.calls == []
            if truncated:
                assert p.result.truncated == {"index": 0, "name": "get_weather", "arguments": None, "text": text}
            else:
                assert p.result.truncated is None and p.result.errors[0]["text"] == text
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)  # in tags, its start streamed, then a stop string
    out = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "')
    assert out and out[0].name == "get_weather"
    p.finish()
    assert p.result.calls == [] and p.result.content is None and "not closed" in p.result.errors[0]["error"]
    p = CallParser(SCHEMAS, streaming_args=True, lenient=True)
    p.feed('{"name": "Ada", "born": 18')
    p.finish()
    assert p.result.content == '{"name": "Ada", "born": 18' and p.result.errors == []


# --------------------------------------------------------------------------- rendering and validation (no model)


def history(n_calls: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather please."}]
    for i in range(n_calls):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": f"City{i}"})}}
        msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        msgs.append({"role": "tool", "content": f"{i} degrees", "tool_call_id": f"call_{i}"})
    return msgs


def test_fallback_renders_calls_as_the_model_is_asked_to_write_them() -> None:
    rendered, tools = render_messages(history(10), TOOLS, ToolFormat(native=False))
    assert tools is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n") and "<tools>" in rendered[0]["content"]
    assistant = [m["content"] for m in rendered if m["role"] == "assistant"]
    assert assistant == [write_call("get_weather", {"city": f"City{i}"}) for i in range(10)]
    assert assistant[3] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "City3"}}\n</tool_call>'
    results = [m["content"] for m in rendered if m["role"] == "user"][1:]
    assert results[2] == "<tool_response>\n2 degrees\n</tool_response>"


def test_native_rendering_passes_arguments_as_objects() -> None:
    rendered, tools = render_messages(history(2), TOOLS, ToolFormat(native=True))
    assert tools == TOOLS
    assert rendered[2]["tool_calls"][0]["function"]["arguments"] == {"city": "City0"}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}]}, "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]},
         "tools[0].function.parameters"),  # valid JSON Schema the grammar cannot enforce
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}}, "response_format.json_schema.schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
            {"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "fly"}}]}}},
         "tool_choice.allowed_tools.tools[1]"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema"),
    ],
)
def test_bad_tool_fields_name_the_field(kwargs: dict[str, Any], param: str) -> None:
    args = {"tools": None, "tool_choice": None, "parallel_tool_calls": None, "response_format": None, **kwargs}
    with pytest.raises(ApiError) as info:
        plan_reply(args["tools"], args["tool_choice"], args["parallel_tool_calls"], args["response_format"], True, ToolFormat(True, 1, 2))
    assert info.value.status == 400 and info.value.param == param


def test_allowed_tools_keep_every_tool_in_the_prompt_and_narrow_the_calls() -> None:
    allowed = [{"type": "function", "function": {"name": TOOLS[1]["function"]["name"]}}]
    for mode in ("auto", "required"):
        plan = plan_reply(TOOLS, {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": allowed}}, None, None, True, ToolFormat(True, 1, 2))
        assert plan.tools == TOOLS and list(plan.schemas) == [TOOLS[1]["function"]["name"]] and plan.choice == mode
        assert plan.grammar is not None and TOOLS[0]["function"]["name"] not in plan.grammar


def test_a_response_format_schema_that_lists_properties_is_closed_as_tool_arguments_are() -> None:
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": person}}
    plan = plan_reply(None, None, None, fmt, True, ToolFormat(True, 1, 2))
    assert plan.answer_schema is not None and plan.answer_schema["additionalProperties"] is False
    from longkv.loading import _gguf_tokenizer

    tok = _gguf_tokenizer(Path(model_path("smollm2-135m")))
    g = Grammar(plan.grammar or "", grammar_tokenizer(tok, [tok.eos_token_id], len(tok)), len(tok))
    ok, c = walk(g, tok, '{"name": "Ada"}')
    assert ok and c.accepting
    assert not walk(g, tok, '{"name": "Ada", "ok": true}')[0]
    open_ = {**person, "additionalProperties": True}  # a schema that says so keeps other keys
    plan = plan_reply(None, None, None, {"type": "json_schema", "json_schema": {"name": "p", "schema": open_}}, True, ToolFormat(True, 1, 2))
    assert plan.answer_schema is not None and plan.answer_schema["additionalProperties"] is True


def test_auto_or_none_without_tools_is_plain_chat() -> None:
    for choice in ("auto", "none"):
        plan = plan_reply(None, choice, None, None, True, ToolFormat(True, 1, 2))
        assert plan.grammar is None and plan.parser() is None


def test_a_reply_written_outside_the_tags_renders_as_written() -> None:
    from longkv.server.tools import WrittenReplies

    text = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    written = WrittenReplies(size=2)
    written.remember(text, [("call_a", "get_weather", {"city": "Oslo"})])
    msgs = [{"role": "user", "content": "Oslo?"}]
    call = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    out, _ = render_messages([*msgs, {"role": "assistant", "content": None, "tool_calls": [call]}], TOOLS, ToolFormat(native=True), written)
    assert out[1] == {"role": "assistant", "content": text}
    other = {**call, "function": {**call["function"], "arguments": '{"city": "Bergen"}'}}  # the client changed the call: as sent
    out, _ = render_messages([*msgs, {"role": "assistant", "content": None, "tool_calls": [other]}], TOOLS, ToolFormat(native=True), written)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Bergen"}
    written.remember("b", [("call_b", "f", {})])
    written.remember("c", [("call_c", "f", {})])
    assert written.text_of([("call_a", "get_weather", {"city": "Oslo"})]) is None and written.text_of([("call_c", "f", {})]) == "c"


def test_bad_history_arguments_are_a_400() -> None:
    msgs = history(1)
    msgs[2]["tool_calls"][0]["function"]["arguments"] = "{city: Oslo"
    with pytest.raises(ApiError) as info:
        render_messages(msgs, TOOLS, ToolFormat(native=True))
    assert info.value.param == "messages[2].tool_calls[0].function.arguments"


def test_masks_apply_exactly() -> None:
    """Sparse, dense and full masks (the three ways a mask is applied) == masked_fill."""
    rng = np.random.default_rng(0)
    for vocab in (151936, 49152, 33):
        logits = torch.randn(vocab)
        for p in (0.0005, 0.5, 0.9995, 1.0):
            allowed = rng.random(vocab) < p
            allowed[1] = True
            padded = np.concatenate([allowed, rng.random(-vocab % 32) < 0.5])
            bits = np.packbits(padded, bitorder="little").view(np.int32).copy()
            assert torch.equal(_apply_bits(bits, logits), logits.masked_fill(~torch.from_numpy(allowed), float("-inf")))


# --------------------------------------------------------------------------- grammars over the real tokenizers


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Any:
    from longkv.loading import _gguf_tokenizer

    return _gguf_tokenizer(Path(model_path(QWEN_ID)))


def walk(grammar: Grammar, tok: Any, text: str) -> tuple[bool, Any]:
    """Feed ``text``'s tokens through a fresh constraint: (all allowed, the constraint)."""
    c = grammar.constraint()
    for t in tok.encode(text, add_special_tokens=False):
        if c.mask(torch.zeros(grammar.vocab_size))[t] != 0:
            return False, c
        c.accept(t)
    return True, c


def test_tool_grammar_on_qwen(qwen_tokenizer: Any) -> None:
    tok = qwen_tokenizer
    fmt = tool_format(tok)
    assert fmt.native and fmt.open_id == tok.convert_tokens_to_ids("<tool_call>") and fmt.close_id is not None
    llt = grammar_tokenizer(tok, [151645, 151643], 151936)
    auto = Grammar(tool_grammar(SCHEMAS, "auto", True, fmt), llt, 151936)
    ok, c = walk(auto, tok, REPLIES[0].replace("東京", "Tokyo"))
    assert ok and c.accepting
    ok, c = walk(auto, tok, "The weather is fine.")
    assert ok and c.accepting
    ok, c = walk(auto, tok, REPLIES[3])  # a fenced call is held to the schemas, then only the end or another block
    assert ok and c.accepting
    allowed = (c.mask(torch.zeros(151936)) == 0).nonzero().flatten().tolist()
    assert {151645, 151643} <= set(allowed) and all(t in (151645, 151643) or tok.decode([t]).strip("\n") == "" for t in allowed)
    for unknown in ('```json\n{"name": "fly", "arguments": {}}\n```', '{"name": "short_joke", "arguments": {"joke": "x"}}'):
        ok, c = walk(auto, tok, unknown)  # naming no tool is allowed (not pushed into a real tool's call) and is text
        parser = CallParser(SCHEMAS, streaming_args=True, lenient=True)
        parser.feed(unknown)
        parser.finish(truncated=False)
        assert ok and c.accepting and parser.result.calls == [] and parser.result.content == unknown
    assert not walk(auto, tok, '{"name": "get_weather", "arguments": {"town": "Rome"}}')[0]  # a tool's name: its schema
    ok, c = walk(auto, tok, REPLIES[5])  # parallel calls as fenced blocks
    assert ok and c.accepting
    assert not walk(auto, tok, "```json\n[1, 2]\n```")[0]
    assert not walk(auto, tok, '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Rome"}}\n</tool_call>')[0]
    assert not walk(auto, tok, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "x": 1}}\n</tool_call>')[0]
    required = Grammar(tool_grammar(SCHEMAS, "required", False, fmt), llt, 151936)
    assert not walk(required, tok, "Hello")[0]
    ok, c = walk(required, tok, '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>')
    assert ok and set((c.mask(torch.zeros(151936)) == 0).nonzero().flatten().tolist()) <= {151645, 151643}  # one call only
    none = Grammar(tool_grammar(SCHEMAS, "none", True, fmt), llt, 151936)
    assert not walk(none, tok, REPLIES[0])[0]


def test_a_forced_call_ends_where_the_model_would_write_prose(qwen_tokenizer: Any) -> None:
    """Under required + parallel, after a call and a newline the model may open another call or end; the mass of
    the prose it would write (forbidden) goes to the end, so a greedy reply ends instead of inventing a call."""
    tok, ends = qwen_tokenizer, [151645, 151643]
    grammar = Grammar(tool_grammar(SCHEMAS, "required", True, tool_format(tok)), grammar_tokenizer(tok, ends, 151936), 151936)
    ok, c = walk(grammar, tok, '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\n')
    assert ok and c.accepting
    fmt_open = tok.convert_tokens_to_ids("<tool_call>")
    assert set((c.mask(torch.zeros(151936)) == 0).nonzero().flatten().tolist()) == {fmt_open, *ends}
    prose = tok.encode("I", add_special_tokens=False)[0]
    logits = torch.full((151936,), -20.0)
    logits[prose], logits[fmt_open], logits[151645], logits[151643] = 5.0, 4.0, 1.0, 0.5
    greedy = c.mask(logits, ends, 0.0)
    assert int(greedy.argmax()) == 151643 and greedy[151643] == 5.0 and greedy[151645] == float("-inf")  # the lowest end id
    sampled = c.mask(logits, ends, 1.0)  # the end carries every forbidden token's probability and its own
    forbidden = torch.ones(151936, dtype=torch.bool)
    forbidden[fmt_open] = False
    assert torch.allclose(sampled[151643], torch.logsumexp(logits[forbidden], 0)) and sampled[fmt_open] == 4.0
    assert torch.equal(c.mask(logits), c.mask(logits, ()))  # without end tokens, a plain mask
    ok, c = walk(grammar, tok, '<tool_call>\n{"name": "list_files')
    assert ok and not c.accepting and not c.mask(logits, ends, 0.0)[ends].isfinite().any()  # inside a call: no end
    auto = Grammar(tool_grammar(SCHEMAS, "auto", True, tool_format(tok)), grammar_tokenizer(tok, ends, 151936), 151936)
    ok, c = walk(auto, tok, '```json\n{"name": "list_files", "arguments": {}}\n```\n\n')  # blank lines after a fenced call
    assert ok and c.accepting and int(c.mask(logits, ends, 0.0).argmax()) == 151643  # may end: not pushed into another fence


def test_none_of_matches_every_name_but_the_tools() -> None:
    from longkv.server.tool_grammar import _none_of

    rx = re.compile(_none_of(["get_weather", "get_time", "a", "ab"]))
    assert not any(rx.fullmatch(n) for n in ("get_weather", "get_time", "a", "ab", ""))
    assert all(rx.fullmatch(n) for n in ("get_", "get_weathe", "get_weatherx", "abc", "b", "g", "short_joke", "math.factorial", "é"))
    assert not rx.fullmatch('x"y') and not rx.fullmatch("x\\y")  # no quote or escape: the name ends at its quote


def test_the_end_fold_by_forbidden_ids_equals_the_pass_over_the_vocabulary() -> None:
    from longkv.engine.grammar import _fold_into_end

    raw = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    forbidden = np.array([3, 17, 998])
    masked = raw.clone()
    masked[forbidden] = float("-inf")
    for temperature in (0.0, 0.7):
        whole = _fold_into_end(raw, masked.clone(), [5, 998], temperature)
        by_ids = _fold_into_end(raw, masked.clone(), [5, 998], temperature, forbidden)
        assert torch.equal(whole, by_ids) and int(torch.isneginf(whole).sum()) == 3
    assert whole[5] == 0.7 * torch.logsumexp(raw[[3, 5, 17, 998]] / 0.7, 0)


def test_tool_grammar_with_plain_text_tags() -> None:
    from longkv.loading import _gguf_tokenizer

    tok = _gguf_tokenizer(Path(model_path("smollm2-135m")))
    fmt = tool_format(tok)
    assert not fmt.native and fmt.open_id is None
    llt = grammar_tokenizer(tok, [tok.eos_token_id], len(tok))
    auto = Grammar(tool_grammar(SCHEMAS, "auto", True, fmt), llt, len(tok))
    ok, c = walk(auto, tok, REPLIES[1].rstrip())
    assert ok and c.accepting
    ok, c = walk(auto, tok, "Sure. <tool_call>\n")  # the tag opens a call: only the call's layout may follow
    assert ok and not c.accepting
    assert not walk(auto, tok, "Sure. <tool_call>\nhello")[0]
    answer = Grammar(tool_grammar(SCHEMAS, "auto", True, fmt, {"type": "object"}), llt, len(tok))  # response_format too
    assert not walk(answer, tok, "Here is")[0]  # no free text: the JSON answer or calls
    ok, c = walk(answer, tok, '{"ok": true}')
    assert ok and c.accepting
    ok, c = walk(answer, tok, REPLIES[1].rstrip())
    assert ok and c.accepting


# --------------------------------------------------------------------------- end to end: longkv serve + the official client

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def qwen_server() -> Iterator[Any]:
    pytest.importorskip("fastapi")
    from longkv.server.launch import ServerProcess

    with ServerProcess(model_path(QWEN_ID), "--max-tokens-default", "96", "--log-level", "warning") as s:
        yield s


@pytest.fixture(scope="module")
def client(qwen_server: Any) -> Any:
    return openai.OpenAI(base_url=qwen_server.url + "/v1", api_key="none", max_retries=0, timeout=300)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client: Any, messages: list[dict[str, Any]], stream: bool = False, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """One chat completion; streamed ones reassembled. Returns (message-like dict, extras)."""
    kw.setdefault("temperature", 0)
    kw.setdefault("tools", TOOLS)
    if not stream:
        r = client.chat.completions.create(model=QWEN_ID, messages=messages, **kw)
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return {"content": m.content, "calls": calls, "finish": r.choices[0].finish_reason, "ids": [c.id for c in m.tool_calls or []]}, {
            "longkv": r.model_extra.get("longkv"), "usage": r.usage,
        }  # fmt: skip
    content, calls, finish, report = None, {}, None, None
    for chunk in client.chat.completions.create(model=QWEN_ID, messages=messages, stream=True, **kw):
        report = chunk.model_extra.get("longkv") or report
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        if d.content:
            content = (content or "") + d.content
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    out = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return {"content": content, "calls": out, "finish": finish, "ids": [c["id"] for c in calls.values()]}, {"longkv": report}


def test_each_tool_choice(client: Any) -> None:
    from jsonschema import validate

    auto, ext = create(client, ASK)
    assert auto["finish"] == "tool_calls" and [n for n, _ in auto["calls"]] == ["get_weather"]
    assert json.loads(auto["calls"][0][1])["city"] == "Paris"
    assert ext["longkv"]["grammar"] is True and 0 < ext["longkv"]["mask_ms_per_token"] < 5
    required, _ = create(client, [{"role": "user", "content": "Hello!"}], tool_choice="required", parallel_tool_calls=False)
    assert required["finish"] == "tool_calls" and len(required["calls"]) == 1 and required["content"] is None
    name, args = required["calls"][0]
    validate(json.loads(args), SCHEMAS[name])
    named, _ = create(client, ASK, tool_choice={"type": "function", "function": {"name": "create_event"}})
    assert [n for n, _ in named["calls"]] == ["create_event"]
    validate(json.loads(named["calls"][0][1]), EVENT)
    only = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "create_event"}}]}}
    narrowed, next_ext = create(client, ASK, tool_choice=only)
    assert {n for n, _ in narrowed["calls"]} == {"create_event"}  # asked the weather, allowed only create_event
    assert next_ext["usage"].prompt_tokens == ext["usage"].prompt_tokens  # every tool still in the prompt
    none, _ = create(client, ASK, tool_choice="none", max_tokens=24)
    assert none["calls"] == [] and none["content"] and none["finish"] in ("stop", "length")


@pytest.mark.parametrize(
    ("messages", "kw"),
    [
        (ASK, {"tool_choice": {"type": "function", "function": {"name": "list_files"}}}),  # zero arguments
        ([{"role": "user", "content": "Put lunch with Ana and 李 on 3 May in my calendar."}], {"tool_choice": "required", "parallel_tool_calls": False}),
        ([{"role": "user", "content": "东京的天气怎么样？"}], {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ([{"role": "user", "content": "Weather in Paris, and in Rome?"}], {"tool_choice": "required", "max_tokens": 56}),
    ],
    ids=["zero-args", "nested", "cjk", "parallel"],
)
def test_streamed_calls_reassemble_to_the_whole_response(client: Any, messages: list[dict[str, Any]], kw: dict[str, Any]) -> None:
    whole, ext = create(client, messages, **kw)
    streamed, _ = create(client, messages, stream=True, **kw)
    assert whole["calls"], whole
    assert streamed["content"] == whole["content"] and streamed["finish"] == whole["finish"]
    if whole["finish"] == "length":  # this small model may call on and on: the call cut off may have been streamed in part
        cut = ext["longkv"]["truncated_tool_call"]
        assert len(whole["calls"]) >= 2 and cut["index"] == len(whole["calls"])
        assert streamed["calls"][: len(whole["calls"])] == whole["calls"]
        extra = streamed["calls"][len(whole["calls"]) :]
        assert len(extra) <= 1 and (not extra or (extra[0][0] == cut["name"] and cut["arguments"].startswith(extra[0][1])))
    else:
        assert streamed["calls"] == whole["calls"]
    assert all(i and i.startswith("call_") for i in streamed["ids"])
    for name, args in whole["calls"]:
        assert isinstance(json.loads(args), dict) and name in SCHEMAS


def test_a_truncated_call_is_not_returned(client: Any) -> None:
    out, ext = create(client, ASK, tool_choice="required", max_tokens=8)
    assert out["finish"] == "length" and out["calls"] == [] and out["content"] is None
    assert ext["longkv"]["truncated_tool_call"]["index"] == 0


def test_json_schema_output_validates(client: Any) -> None:
    from jsonschema import validate

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    out, _ = create(client, [{"role": "user", "content": "Invent a person."}], tools=openai.NOT_GIVEN, response_format=fmt)
    validate(json.loads(out["content"]), schema)
    obj, _ = create(client, [{"role": "user", "content": "Three colours as JSON."}], tools=openai.NOT_GIVEN, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj["content"]), dict)


def test_history_of_calls_extends_the_cached_prompt(client: Any) -> None:
    """A tool loop: each turn's prompt re-renders the last reply byte for byte, so the prefix cache covers it."""
    salt = {"longkv": {"cache_salt": uuid.uuid4().hex}}
    messages = history(10)
    messages.append({"role": "user", "content": "And the weather in Paris?"})
    prev_total = 0
    for turn in range(2):
        r = client.chat.completions.create(model=QWEN_ID, messages=messages, tools=TOOLS, temperature=0, extra_body=salt, tool_choice="required", parallel_tool_calls=False)
        u = r.usage
        if turn:
            assert u.prompt_tokens_details.cached_tokens >= prev_total  # the last prompt and reply, all cached
        prev_total = u.prompt_tokens + u.completion_tokens
        call = r.choices[0].message.tool_calls[0]
        messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
        messages.append({"role": "tool", "content": "20 degrees", "tool_call_id": call.id})


def test_a_call_written_as_json_comes_back_as_written_so_the_cache_covers_it(client: Any) -> None:
    """Qwen2.5-Coder-0.5B writes these calls as fenced JSON, not in tags: the next turn renders that reply as the
    model wrote it (the template would write it in tags), so its tokens are not prefilled again."""
    weather = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}}]  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What's the weather in São Paulo and in Zürich? Use Celsius."}]
    salt = {"longkv": {"cache_salt": uuid.uuid4().hex}}
    r = client.chat.completions.create(model=QWEN_ID, messages=messages, tools=weather, temperature=0, max_tokens=120, extra_body=salt)
    assert r.model_extra["longkv"]["recovered_tool_calls"] >= 1 and r.choices[0].finish_reason == "tool_calls"
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in r.choices[0].message.tool_calls]
    again = client.chat.completions.create(model=QWEN_ID, messages=messages, tools=weather, temperature=0, max_tokens=8, extra_body=salt)
    assert again.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens + r.usage.completion_tokens - 1  # all but the reply's last token


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ],
)
def test_bad_tools_over_http_are_400(qwen_server: Any, body: dict[str, Any], param: str) -> None:
    import httpx

    r = httpx.post(qwen_server.url + "/v1/chat/completions", json={"model": QWEN_ID, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or "") or param in r.json()["error"]["message"]


@pytest.mark.slow
def test_smolagents_tool_calling_agent_completes_a_two_tool_task(qwen_server: Any) -> None:
    """A real agent framework as the client: smolagents' ToolCallingAgent over the OpenAI API (about a minute
    on 2 cores: `pytest -m slow tests/test_tools.py`)."""
    smolagents = pytest.importorskip("smolagents")
    calls: list[tuple[str, str]] = []

    @smolagents.tool
    def find_user_id(name: str) -> str:
        """Look up the user id of a person by name.

        Args:
            name: the person's first name.
        """
        calls.append(("find_user_id", name))
        return {"alice": "u-4821"}.get(name.lower(), "unknown user")

    @smolagents.tool
    def get_balance(user_id: str) -> str:
        """The account balance of a user id, in euros.

        Args:
            user_id: the user id that find_user_id returned.
        """
        calls.append(("get_balance", user_id))
        return {"u-4821": "1234.50 EUR"}.get(user_id, "no such user id")

    model = smolagents.OpenAIServerModel(model_id=QWEN_ID, api_base=qwen_server.url + "/v1", api_key="none", temperature=0, parallel_tool_calls=False)
    agent = smolagents.ToolCallingAgent(tools=[find_user_id, get_balance], model=model, max_steps=5, verbosity_level=0)
    answer = agent.run("Find the user id of Alice, then get the balance of that user id.")
    assert "1234.5" in str(answer)
    assert ("find_user_id", "Alice") in calls and ("get_balance", "u-4821") in calls


def test_the_matcher_is_never_read_while_its_next_mask_is_computed() -> None:
    """The next mask is computed in a background thread while the engine runs; llguidance's matcher takes no
    two threads at once ("Already mutably borrowed"): ``done`` and ``accepting`` must not touch it then."""
    import threading
    import time

    from longkv.engine.grammar import GrammarConstraint

    class Matcher:  # a matcher that fails as llguidance's does on a read during a computation
        def __init__(self) -> None:
            self.busy = threading.Lock()
            self.computing = threading.Event()
            self.stopped = False

        def _enter(self) -> None:
            if not self.busy.acquire(blocking=False):
                raise RuntimeError("Already mutably borrowed")
            self.busy.release()

        def is_error(self) -> bool:
            return False

        def unsafe_compute_mask_ptr(self, ptr: int, nbytes: int) -> None:
            with self.busy:
                self.computing.set()
                time.sleep(0.05)
                self.computing.clear()

        def consume_token(self, token: int) -> bool:
            self._enter()
            self.stopped = token == 1
            return True

        def is_stopped(self) -> bool:
            self._enter()
            return self.stopped

        def is_accepting(self) -> bool:
            self._enter()
            return self.stopped

    m = Matcher()
    g = GrammarConstraint(m, 64)
    for token in (5, 7, 1):
        g.mask(torch.zeros(64))
        g.accept(token)
        assert m.computing.wait(5)
        assert g.done == (token == 1) and g.accepting == (token == 1)  # read while the next mask is computing


def test_closing_reaches_nested_objects_and_leaves_what_a_schema_says() -> None:
    from longkv.server.tool_grammar import _closed

    user = {"type": "object", "properties": {"name": {"type": "string"}}}
    schema = {
        "type": "object",
        "properties": {"user": user, "tags": {"type": "array", "items": user, "uniqueItems": True},
                       "either": {"anyOf": [user, {"type": "null"}]}, "ref": {"$ref": "#/$defs/U"},
                       "open": {**user, "additionalProperties": True}, "both": {"allOf": [user, {"properties": {"age": {"type": "integer"}}}]}},
        "$defs": {"U": user},
    }  # fmt: skip
    before = json.dumps(schema)
    out = _closed(schema)
    assert json.dumps(schema) == before  # a copy
    p = out["properties"]
    assert out["additionalProperties"] is False and p["user"]["additionalProperties"] is False
    assert p["tags"]["items"]["additionalProperties"] is False and "uniqueItems" not in p["tags"]
    assert p["either"]["anyOf"][0]["additionalProperties"] is False and out["$defs"]["U"]["additionalProperties"] is False
    assert p["open"]["additionalProperties"] is True
    assert all("additionalProperties" not in m for m in p["both"]["allOf"])  # closing each member would refuse the other's keys


def test_nested_objects_of_a_call_or_an_answer_get_no_invented_keys() -> None:
    """A 135M model invented "phone", "age" and "role" inside a nested ``user`` object: nested objects are closed too."""
    from longkv.loading import _gguf_tokenizer

    tok = _gguf_tokenizer(Path(model_path("smollm2-135m")))
    user = {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name"]}
    tools = [{"type": "function", "function": {"name": "add_user", "parameters": {"type": "object", "properties": {"user": user}, "required": ["user"]}}}]
    plan = plan_reply(tools, "required", None, None, True, tool_format(tok))
    g = Grammar(plan.grammar or "", grammar_tokenizer(tok, [tok.eos_token_id], len(tok)), len(tok))
    call = '<tool_call>\n{"name": "add_user", "arguments": {"user": {"name": "Bob"%s}}}\n</tool_call>'
    assert walk(g, tok, call % ', "email": "b@x.io"')[1].accepting
    assert not walk(g, tok, call % ', "phone": "555"')[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"person": user}}}}
    plan = plan_reply(None, None, None, fmt, True, tool_format(tok))
    g = Grammar(plan.grammar or "", grammar_tokenizer(tok, [tok.eos_token_id], len(tok)), len(tok))
    assert walk(g, tok, '{"person": {"name": "Ada"}}')[1].accepting
    assert not walk(g, tok, '{"person": {"name": "Ada", "born": 1815}}')[0]


def test_schemas_the_grammar_cannot_enforce() -> None:
    """``uniqueItems`` (Pydantic's ``set``) is left to the parser's check; ``contains`` is a 400 unless the
    reply compiles no schema (``tool_choice: none``)."""
    from longkv.server.tools import check_arguments

    tags = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    has = {"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": "a"}}}}
    tools = [{"type": "function", "function": {"name": "tag", "parameters": tags}}, {"type": "function", "function": {"name": "has", "parameters": has}}]
    assert plan_reply(tools[:1], "auto", None, None, True, ToolFormat(True, 1, 2)).grammar is not None
    assert check_arguments(tags, {"tags": ["a", "a"]}) is not None and check_arguments(tags, {"tags": ["a", "b"]}) is None
    assert plan_reply(tools, "none", None, None, True, ToolFormat(True, 1, 2)).schemas
    with pytest.raises(ApiError) as info:
        plan_reply(tools, "auto", None, None, True, ToolFormat(True, 1, 2))
    assert info.value.status == 400 and info.value.param == "tools[1].function.parameters" and "contains" in str(info.value)
