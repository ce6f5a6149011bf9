"""Server limits in process (FastAPI's TestClient, a tiny random Llama in float32): a request's default
``max_tokens`` under a KV budget, and policy knobs that are refused before anything runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from longkv import LLM
from longkv.server.app import create_app
from longkv.server.worker import ServerConfig, plan


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=tiny_llama, dtype="float32", chunk_size=64)


@pytest.fixture()
def client(llm: LLM) -> Iterator[TestClient]:
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", cache_bytes=0, max_num_seqs=1))) as c:
        yield c


def post(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "temperature": 0, **body})


def test_default_max_tokens_fits_the_kv_budget(llm: LLM) -> None:
    """Without max_tokens, a dense request asks for what its pages can hold in the KV budget, not for a default it
    would be refused for; a request that names max_tokens keeps it (and the engine refuses it with its numbers)."""
    c, ps = llm.config, llm.engine_config.page_size
    page = ps * (c.n_kv_heads * c.head_dim * 2 * 4 + 8)  # float32 K and V of every KV head, and the position
    budget = 3 * c.n_layers * page  # three pages in every layer
    cfg = ServerConfig(model_id="tiny", default_max_tokens=1024, kv_budget_bytes=budget)
    ids = list(range(5, 25))
    got = plan(llm, cfg, ids, None, {})
    assert got.params.max_new_tokens == 3 * ps - len(ids) - 1
    assert plan(llm, cfg, ids, 400, {}).params.max_new_tokens == 400
    roomy = ServerConfig(model_id="tiny", default_max_tokens=16, kv_budget_bytes=budget)
    assert plan(llm, roomy, ids, None, {}).params.max_new_tokens == 16


@pytest.mark.parametrize(("policy", "needle"), [
    ("dense:kv_quant=int2", "unknown kv_quant 'int2'"),
    ("block_topk:kv_quant=fp8", "unknown kv_quant 'fp8'"),
    ("streaming:window=-1", "window must be >= 1, got -1"),
])  # fmt: skip
def test_bad_policy_knobs_are_400s_and_serving_goes_on(client: TestClient, policy: str, needle: str) -> None:
    r = post(client, messages=[{"role": "user", "content": "hi"}], longkv={"policy": policy})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    for stream in (False, True):  # the one slot is free again: a good request runs
        r = post(client, messages=[{"role": "user", "content": "hi"}], stream=stream)
        assert r.status_code == 200 and "error" not in r.text, r.text
    h = client.get("/health").json()
    assert h["running"] == 0 and h["queued"] == 0


@pytest.mark.parametrize(("path", "body", "message", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content: expected a string or a list of text parts, got 5", "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5},
     "stop: expected a string or a list of strings, got 5", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", 3]},
     "stop.1: Input should be a valid string", "stop.1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text: Field required", "messages.0.content.0.text"),
    ("/v1/completions", {"prompt": [[1, 2]]},
     "prompt: expected a string, a list of integers or a list of strings, got [[1, 2]]", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "20 degrees"}]},
     "messages.1: Value error, a tool message needs tool_call_id: send the id of the call it answers "
     "(the assistant message's tool_calls[i].id)", "messages.1"),
])  # fmt: skip
def test_a_value_that_fits_no_member_of_a_union_is_one_line(client: TestClient, path: str, body: dict, message: str, param: str) -> None:
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 400 and r.json()["error"]["message"] == message and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(("body", "kind"), [(b"[1, 2]", "a JSON array"), (b'"hi"', "a JSON string"), (b"7", "a JSON number")])
def test_a_json_body_that_is_not_an_object_says_what_it_is(client: TestClient, body: bytes, kind: str) -> None:
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and msg.startswith(f"the request body must be one JSON object, got {kind}") and "Content-Type" not in msg
