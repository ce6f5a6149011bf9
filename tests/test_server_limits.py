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
from longkv.errors import LongKVError
from longkv.server.app import create_app
from longkv.server.worker import EngineWorker, Event, QueueFull, ServerConfig, ServerStopping, plan


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
    """Without max_tokens, a dense request asks for what its pages can hold in the KV budget (a page per layer to
    spare, for a prompt found in the prefix cache), not for a default it would be refused for; a request that names
    more than the budget holds is refused at once with its numbers, before it takes a place in the queue."""
    c, ps = llm.config, llm.engine_config.page_size
    page = ps * (c.n_kv_heads * c.head_dim * 2 * 4 + 8)  # float32 K and V of every KV head, and the position
    budget = 3 * c.n_layers * page  # three pages in every layer
    cfg = ServerConfig(model_id="tiny", default_max_tokens=1024, kv_budget_bytes=budget)
    ids = list(range(5, 25))
    got = plan(llm, cfg, ids, None, {})
    assert got.params.max_new_tokens == 3 * ps - len(ids) - 1 - ps
    fits = 3 * ps - len(ids) - 1  # three pages exactly, with the last token fed for the prefix cache
    assert plan(llm, cfg, ids, fits, {}).params.max_new_tokens == fits
    with pytest.raises(LongKVError) as e:
        plan(llm, cfg, ids, fits + 1, {})
    assert f"({len(ids)} prompt tokens + {fits + 1} new under dense), more than the engine's KV budget" in str(e.value)
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
     "messages[0].content: expected a string or a list of text parts, got 5", "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5},
     "stop: expected a string or a list of strings, got 5", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", 3]},
     "stop[1]: Input should be a valid string", "stop[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text: Field required", "messages[0].content[0].text"),
    ("/v1/completions", {"prompt": [[1, 2]]},
     "prompt: expected a string, a list of integers or a list of strings, got [[1, 2]]", "prompt"),
])  # fmt: skip
def test_a_value_that_fits_no_member_of_a_union_is_one_line(client: TestClient, path: str, body: dict, message: str, param: str) -> None:
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 400 and r.json()["error"]["message"] == message and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(("body", "kind"), [(b"[1, 2]", "a JSON array"), (b'"hi"', "a JSON string"), (b"7", "a JSON number")])
def test_a_json_body_that_is_not_an_object_says_what_it_is(client: TestClient, body: bytes, kind: str) -> None:
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and msg.startswith(f"the request body must be one JSON object, got {kind}") and "Content-Type" not in msg


def test_a_burst_is_bounded_by_max_num_seqs_plus_max_queue(llm: LLM) -> None:
    """Requests that arrive together, before the engine thread takes any (it is inside a step), count against the
    queue too: 2 places + 2 queued, the fifth is a 429."""
    worker = EngineWorker(llm, ServerConfig(model_id="tiny", cache_bytes=0, max_num_seqs=2, max_queue=2))  # not started
    cfg = worker.config
    jobs = [worker.submit(plan(llm, cfg, [5, 6, 7], 2, {}), lambda ev: None) for _ in range(4)]
    with pytest.raises(QueueFull) as e:
        worker.submit(plan(llm, cfg, [5, 6, 7], 2, {}), lambda ev: None)
    assert e.value.retry_after == 2  # two wait beyond the free places
    worker.cancel(jobs[0])  # one leaves the queue: room for one more
    worker.submit(plan(llm, cfg, [5, 6, 7], 2, {}), lambda ev: None)


def complete(client: TestClient, **body: Any) -> Any:
    base = {"model": "tiny", "prompt": [5, 17, 33, 9, 41, 12], "max_tokens": 12, "longkv": {"ignore_eos": True}}
    return client.post("/v1/completions", json={**base, **body})


def test_vllm_style_sampling_fields_are_honoured(client: TestClient, llm: LLM) -> None:
    """top_k, min_p, repetition_penalty and ignore_eos at the top level (vLLM's names) change the sample as the
    engine's own parameters do; a seed of -1 (llama.cpp's "random") is no fixed seed."""
    prompt = [5, 17, 33, 9, 41, 12]
    greedy = complete(client, temperature=0).json()["choices"][0]["text"]
    assert complete(client, temperature=1.5, top_k=1, seed=3).json()["choices"][0]["text"] == greedy
    assert complete(client, temperature=1.5, min_p=1.0, seed=3).json()["choices"][0]["text"] == greedy
    want = llm.generate_batch([prompt], max_new_tokens=12, ignore_eos=True, repetition_penalty=1.8)[0].text
    got = complete(client, temperature=0, repetition_penalty=1.8).json()
    assert got["choices"][0]["text"] == want != greedy and "ignored_fields" not in (got.get("longkv") or {})
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "ignore_eos": True, "temperature": 0,
                                             "skip_special_tokens": True})  # what longkv does anyway: accepted  # fmt: skip
    assert r.json()["usage"]["completion_tokens"] == 3 and "ignored_fields" not in (r.json().get("longkv") or {})
    random = {complete(client, temperature=1.5, seed=-1).json()["choices"][0]["text"] for _ in range(3)}
    assert len(random) > 1


@pytest.mark.parametrize(("body", "message"), [
    ({"repeat_penalty": 1.1}, "repeat_penalty is not supported by longkv serve: send repetition_penalty"),
    ({"typical_p": 0.9}, "typical_p is not supported by longkv serve: leave it out"),
    ({"guided_json": {"type": "object"}}, "guided_json is not supported by longkv serve: send response_format"),
    ({"top_k": 5, "longkv": {"top_k": 3}}, "top_k 5 and longkv.top_k 3 differ: send one of them"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream: true"),
    ({"min_p": 1.5}, "min_p: Input should be less than or equal to 1"),
    ({"grammar": "root ::= [0-9]+"}, "grammar is not supported by longkv serve: send response_format (a JSON schema) or tools"),
    ({"skip_special_tokens": False}, "skip_special_tokens is not supported by longkv serve: leave it out"),
])  # fmt: skip
def test_sampling_fields_longkv_cannot_honour_are_400s(client: TestClient, body: dict, message: str) -> None:
    r = complete(client, **body)
    assert r.status_code == 400 and r.json()["error"]["message"] == message, r.text


def test_a_shutdown_ends_queued_requests_at_once_and_running_ones_after_the_grace(llm: LLM) -> None:
    worker = EngineWorker(llm, ServerConfig(model_id="tiny", cache_bytes=0, max_num_seqs=1, max_queue=2))  # not started
    got: list[list[Event]] = [[], []]
    for i in range(2):
        worker.submit(plan(llm, worker.config, [5, 6, 7], 2, {}), got[i].append)
    worker.drain("the server is shutting down")
    assert [[(e.kind, str(e.error)) for e in g] for g in got] == [
        [("error", "the server is shutting down: send the request again once it is back")]
    ] * 2
    with pytest.raises(ServerStopping):
        worker.submit(plan(llm, worker.config, [5, 6, 7], 2, {}), lambda ev: None)


def test_a_tool_message_must_answer_a_call_of_the_assistant_message_before_it(client: TestClient) -> None:
    """A broken agent loop (a result sent with the wrong id, or with no call at all) is a 400, not a reply."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    user = {"role": "user", "content": "Weather in Oslo?"}
    asked = {"role": "assistant", "content": None, "tool_calls": [call]}
    for msgs, at, why in [
        ([user, asked, {"role": "tool", "content": "sunny"}], 2, "messages[2] is a tool message without tool_call_id: send the id"),
        ([user, {"role": "tool", "tool_call_id": "call_zzz", "content": "sunny"}], 1, "no assistant message comes before it"),
        ([user, asked, {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}], 2, "the assistant message before it made 'call_1'"),
        ([user, asked, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "user", "content": "and?"},
          {"role": "tool", "tool_call_id": "call_1", "content": "again"}], 4, "no assistant message comes before it"),
    ]:  # fmt: skip
        r = post(client, messages=msgs)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == f"messages[{at}].tool_call_id" and why in err["message"], r.text
    assert post(client, messages=[user, asked, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]).status_code == 200
    plain = {"role": "assistant", "content": "I will look."}  # a scripted turn without calls: its results are taken as they come
    assert post(client, messages=[user, plain, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]).status_code == 200
