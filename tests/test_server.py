"""`longkv serve` end to end: the real SmolLM2-135M behind the server, the official `openai` client in front.

The server runs in a child process on a free loopback port (float32, two requests
per batch, at most one more waiting). Skipped where ../shared (the real model) is absent.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from longkv.server.launch import PROJECT_ROOT, ServerProcess  # noqa: E402

SHARED = PROJECT_ROOT.parent / "shared"
MODEL_ID = "smollm2-135m"


def smollm2_path() -> str:
    getter = SHARED / "models" / "get-model"
    if not getter.exists():
        pytest.skip("../shared/models/get-model is absent: the real SmolLM2 model is needed")
    proc = subprocess.run([str(getter), "smollm2-135m"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not fetch smollm2-135m: {proc.stderr.strip()[-200:]}")
    return proc.stdout.strip().splitlines()[-1]


def book(chars: int, start: int = 10_000) -> str:
    path = SHARED / "data" / "books" / "moby-dick.txt"
    if not path.exists():
        pytest.skip("../shared/data/books is absent")
    return path.read_text()[start : start + chars]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = (
        "--dtype", "float32", "--max-num-seqs", "2", "--max-queue", "1", "--max-tokens-default", "32", "--kv-budget-mib", "1024",
        "--log-level", "warning",
    )  # fmt: skip
    with ServerProcess(smollm2_path(), *args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def metric(server: ServerProcess, name: str) -> float:
    """The value of an unlabelled metric from /metrics."""
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(server: ServerProcess, limit: float = 60.0) -> float:
    """Seconds until nothing runs or waits (polling /health every 20 ms)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        h = health(server)
        if h["running"] == 0 and h["queued"] == 0:
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise AssertionError(f"server still busy after {limit} s: {health(server)}")


@pytest.fixture(autouse=True)
def _idle_before(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        wait_idle(request.getfixturevalue("server"))


def salted(**ext: object) -> dict:
    """extra_body with a fresh cache salt: the request starts from an empty prefix cache."""
    return {"longkv": {"cache_salt": uuid.uuid4().hex, **ext}}


def chat(client: openai.OpenAI, messages: list[dict], extra: dict | None = None, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, extra_body=extra, **kw)


# --------------------------------------------------------------------------- chat template


def test_smollm2_template_renders_each_turn_as_a_prefix_of_the_next() -> None:
    from longkv.loading import _gguf_tokenizer

    tok = _gguf_tokenizer(Path(smollm2_path()))
    turns = [("What is the capital of France?", "The capital of France is Paris."), ("And Germany?", "Berlin."), ("Thanks!", "You're welcome!")]
    for system in (None, "You answer in one short sentence."):
        msgs: list[dict] = [{"role": "system", "content": system}] if system else []
        prev_text, prev_ids = None, None
        for user, answer in turns:
            msgs.append({"role": "user", "content": user})
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            if prev_text is not None:
                # the template injects its default system prompt at the very start of every
                # rendering (only when the first message is not a system message): stable
                assert text.startswith(prev_text)
                assert ids[: len(prev_ids)] == prev_ids
            # this turn's prompt, then the answer's tokens and <|im_end|>, start the next turn
            answered = ids + tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
            msgs.append({"role": "assistant", "content": answer})
            nxt = tok.encode(tok.apply_chat_template([*msgs, {"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
            assert nxt[: len(answered)] == answered
            prev_text, prev_ids = text, ids


# --------------------------------------------------------------------------- endpoints


def test_models_health_and_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL_ID
    started = Path(server.log.name).read_text()  # what the terminal showed while the model loaded, then where it serves
    assert f"loading {smollm2_path()} ..." in started and f"as {MODEL_ID!r} on {server.url}/v1" in started, started
    chat(client, [{"role": "user", "content": "Say hi."}], salted(), max_tokens=4)
    text = httpx.get(server.url + "/metrics", timeout=5).text
    for name in (
        "longkv_requests_total", "longkv_prompt_tokens_total", "longkv_completion_tokens_total",
        "longkv_prefill_tokens_per_second", "longkv_decode_tokens_per_second",
        "longkv_time_to_first_token_seconds_bucket", "longkv_prefix_cache_hits_total",
        "longkv_prefix_cache_misses_total", "longkv_prefix_cache_evictions_total",
        "longkv_prefix_cache_bytes", "longkv_queue_length", "longkv_requests_running", "longkv_batch_size", "longkv_kv_pages_used", "longkv_kv_pages_free",
        "longkv_kv_pool_bytes", "longkv_kv_compactions_total",
        "longkv_inter_token_latency_seconds_bucket", "longkv_active_kv_bytes", "longkv_queue_time_seconds_bucket",
    ):  # fmt: skip
        assert f"\n{name}" in text, name
    count = [ln for ln in text.splitlines() if ln.startswith('longkv_requests_total{endpoint="chat",status="200"}')]
    assert count and float(count[0].split()[-1]) >= 1


def test_warm_equals_cold(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "List three colours of the rainbow."}]
    extra = salted()
    runs = [chat(client, msgs, extra, max_tokens=16) for _ in range(3)]
    texts = [r.choices[0].message.content for r in runs]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in runs]
    assert texts[0] and texts[0] == texts[1] == texts[2]
    assert [r.usage.completion_tokens for r in runs] == [runs[0].usage.completion_tokens] * 3
    assert cached[0] == 0 and cached[1] == cached[2] == runs[0].usage.prompt_tokens > 0
    off = chat(client, msgs, {"longkv": {"cache": False}}, max_tokens=16)
    assert off.choices[0].message.content == texts[0] and off.usage.prompt_tokens_details.cached_tokens == 0


def test_multi_turn_reuses_prompt_and_output(client: openai.OpenAI) -> None:
    extra = salted(session="chat-1")
    msgs = [{"role": "user", "content": "Name a large sea mammal."}]
    t1 = chat(client, msgs, extra)
    msgs += [{"role": "assistant", "content": t1.choices[0].message.content}, {"role": "user", "content": "How big does it get?"}]
    t2 = chat(client, msgs, extra)
    assert t2.usage.prompt_tokens_details.cached_tokens >= t1.usage.prompt_tokens + t1.usage.completion_tokens
    assert t2.usage.prompt_tokens > t2.usage.prompt_tokens_details.cached_tokens  # the new user turn was computed
    cold = chat(client, msgs, {"longkv": {"cache": False}})
    assert t2.choices[0].message.content == cold.choices[0].message.content


def test_streaming_matches_non_streaming(server: ServerProcess, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = chat(client, msgs, salted(), max_tokens=12)
    stream = chat(client, msgs, salted(), max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_unknown_fields_are_named_back_not_acted_on(server: ServerProcess, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Say hi."}]
    plain = chat(client, msgs, salted(), max_tokens=4)
    assert plain.model_extra.get("longkv") is None  # nothing ignored, nothing to report
    typo = chat(client, msgs, {**salted(), "max_token": 2, "store": False}, max_tokens=4)
    assert typo.model_extra["longkv"] == {"ignored_fields": ["max_token", "store"]}
    assert typo.usage.completion_tokens == plain.usage.completion_tokens == 4  # max_tokens still rules
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "stream": True, "metadata": {"a": "b"}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert json.loads(lines[-2][6:])["longkv"] == {"ignored_fields": ["metadata"]}


def test_completions_with_text_and_token_ids(client: openai.OpenAI) -> None:
    a = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=6, temperature=0, extra_body=salted())
    assert a.object == "text_completion" and a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"
    ids = [504, 3575, 282, 4649, 314]  # any valid ids
    b = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=3, temperature=0, extra_body=salted())
    assert b.usage.prompt_tokens == len(ids) and b.usage.completion_tokens == 3
    c = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert c.choices[0].finish_reason == "stop" and " 7" not in c.choices[0].text and "6" in c.choices[0].text


def test_seeded_sampling_reproduces(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Tell me a word."}]
    a = chat(client, msgs, salted(), temperature=1.0, seed=1234, max_tokens=10)
    b = chat(client, msgs, salted(), temperature=1.0, seed=1234, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    greedy = chat(client, msgs, salted(), max_tokens=6)
    for top_p in (1e-50, 0.0):  # below float32's range, and OpenAI's "most likely token only"
        c = chat(client, msgs, salted(), temperature=1.0, top_p=top_p, max_tokens=6)
        assert c.choices[0].message.content == greedy.choices[0].message.content


def test_concurrent_chats_are_isolated(client: openai.OpenAI) -> None:
    convs = {
        "a": [{"role": "user", "content": "Describe a cat in one sentence."}],
        "b": [{"role": "user", "content": "Describe a rocket engine in one sentence."}],
    }
    solo = {k: chat(client, m, {"longkv": {"cache": False}}).choices[0].message.content for k, m in convs.items()}
    results: dict[str, list[str]] = {}
    # both run in one batch (max_num_seqs 2): a third request in between may get a 429, which clients retry
    patient = client.with_options(max_retries=10)

    def run(key: str) -> None:
        extra = {"longkv": {"session": f"iso-{key}"}}
        msgs = list(convs[key])
        out = []
        for follow in ("Say it again.", "Once more."):
            r = chat(patient, msgs, extra)
            out.append(r.choices[0].message.content)
            msgs += [{"role": "assistant", "content": out[-1]}, {"role": "user", "content": follow}]
        results[key] = out

    threads = [threading.Thread(target=run, args=(k,)) for k in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["a"][0] == solo["a"] and results["b"][0] == solo["b"]
    assert "rocket" not in " ".join(results["a"]).lower() and "cat " not in " ".join(results["b"]).lower()


def test_eviction_policy_requests_recompute(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": book(600)}]
    tight = salted(policy="streaming", budget=64)
    r1, r2 = chat(client, msgs, tight, max_tokens=4), chat(client, msgs, tight, max_tokens=4)
    assert r1.usage.prompt_tokens > 64
    assert r1.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens_details.cached_tokens == 0
    roomy = salted(policy="streaming", budget=2048)  # never evicts here: the KV is the dense KV
    r3, r4 = chat(client, msgs, roomy, max_tokens=4), chat(client, msgs, roomy, max_tokens=4)
    assert r4.usage.prompt_tokens_details.cached_tokens == r4.usage.prompt_tokens
    assert r3.choices[0].message.content == r4.choices[0].message.content


# --------------------------------------------------------------------------- errors


def test_overflow_is_a_400_with_the_numbers(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=[1] * 8200, max_tokens=4)
    err = e.value.body
    assert e.value.status_code == 400
    assert (err["n_prompt_tokens"], err["n_ctx"], err["max_tokens"]) == (8200, 8192, 4)
    assert err["code"] == "context_length_exceeded" and "8192" in err["message"] and "\"policy\": \"auto\"" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=[1] * 8000, max_tokens=500)
    assert (e.value.body["n_prompt_tokens"], e.value.body["n_ctx"], e.value.body["max_tokens"]) == (8000, 8192, 500)
    assert e.value.body["param"] == "prompt"  # a completion's prompt, not messages
    with pytest.raises(openai.BadRequestError) as e:  # chat too, and without max_tokens
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "word " * 8300}])
    assert e.value.body["n_prompt_tokens"] > 8192 and e.value.body["n_ctx"] == 8192



def test_a_request_beyond_the_kv_budget_is_a_400_before_any_prefill(server: ServerProcess, client: openai.OpenAI) -> None:
    # 24 K tokens under block_topk (every token kept): ~1.1 GB of float32 KV for SmolLM2, over the 1024 MiB budget
    extra = salted(policy="block_topk")
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=[100] * 24_000, max_tokens=4, extra_body=extra)
    assert time.perf_counter() - t0 < 30  # refused at admission, not after a 24 K-token prefill
    msg = e.value.body["message"]
    assert "more than the engine's KV budget of 1024.0 MiB" in msg and "24000 prompt tokens + 4 new" in msg
    with pytest.raises(openai.BadRequestError) as e:  # a stream too: its headers wait for the engine's admission
        client.completions.create(model=MODEL_ID, prompt=[100] * 24_000, max_tokens=4, stream=True, extra_body=extra)
    assert "more than the engine's KV budget" in e.value.body["message"]
    assert chat(client, [{"role": "user", "content": "Say hi."}]).choices[0].message.content  # serving on


BAD_BODIES = [
    ("malformed JSON", b'{"model": "smollm2-135m", "messages": [', 400),
    ("a list, not an object", b"[1, 2, 3]", 400),
    ("no messages", {"model": MODEL_ID}, 400),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400),
    ("messages is a string", {"model": MODEL_ID, "messages": "hi"}, 400),
    ("max_tokens is a string", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400),
    ("negative max_tokens", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400),
    ("temperature is a string", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ("top_p above 1", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400),
    ("unknown role", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("image part", {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("n=2", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ("five stops", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400),
    ("tools", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
    ("unknown policy", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "longkv": {"policy": "nope"}}, 400),
    ("unknown extension key", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "longkv": {"polcy": "dense"}}, 400),
    ("budget too small", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "longkv": {"policy": "streaming", "budget": 2}}, 400),
    ("negative loop guard", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "longkv": {"dry_multiplier": -1.0}}, 400),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
]


@pytest.mark.parametrize(("what", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_chat_requests_get_openai_errors(server: ServerProcess, what: str, body: object, status: int) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize(("choice", "param", "message"), [
    ("sometimes", "tool_choice", "tool_choice: Input should be 'none', 'auto' or 'required'"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}},
     "tool_choice.allowed_tools.mode", "tool_choice.allowed_tools.mode: Input should be 'auto' or 'required'"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, "tool_choice.allowed_tools.tools",
     "tool_choice.allowed_tools.tools: List should have at least 1 item"),
    ({"type": "allowed_tools"}, "tool_choice.allowed_tools", "tool_choice.allowed_tools: Field required"),
    ({"type": "function"}, "tool_choice.function", "tool_choice.function: Field required"),
    (5, "tool_choice", "tool_choice: Input should be 'none', 'auto', 'required', a function object or an allowed_tools object"),
])  # fmt: skip
def test_a_bad_tool_choice_is_judged_as_the_form_it_was_meant_as(server: ServerProcess, choice: object, param: str, message: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": choice}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(message) and "more)" not in err["message"], err


def test_malformed_json_says_so(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["message"].startswith("the request body is not valid JSON")
    assert "at character 28" in err["message"], err["message"]


@pytest.mark.parametrize(("content", "kind", "says"), [
    (b"model=x&messages=hi", "application/x-www-form-urlencoded", "(got application/x-www-form-urlencoded): send it with Content-Type: application/json"),
    (b"[1, 2]", "application/json", ", got a JSON array: send {"),
])  # fmt: skip
def test_a_body_that_is_not_an_object_says_so(server: ServerProcess, content: bytes, kind: str, says: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"content-type": kind}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["message"].startswith("the request body must be one JSON object"), err
    assert says in err["message"], err["message"]


def test_a_nan_temperature_is_refused_as_not_finite(server: ServerProcess) -> None:
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 2, "temperature": NaN}'
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert "temperature: Input should be a finite number" in r.json()["error"]["message"], r.json()


def test_token_ids_outside_the_vocabulary_are_a_400(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": [1, 10**6], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400
    assert "token id 1000000 is outside the vocabulary [0, " in r.json()["error"]["message"], r.json()


def test_an_image_part_is_named_as_such(server: ServerProcess) -> None:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "user", "content": parts}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    assert r.json()["error"]["message"] == ("messages[0].content: part 1 is 'image_url': longkv serves text models, "
                                           "so content takes text parts only (send the text)")  # fmt: skip


def test_every_bad_field_is_named(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, timeout=30)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "model: Field required" in msg and "max_tokens:" in msg and "more)" not in msg, msg


def test_serve_on_a_port_in_use_fails_before_loading() -> None:
    import socket

    from typer.testing import CliRunner

    from longkv.cli import app
    from longkv.errors import LongKVError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist: the port error must come first, i.e. before loading
        result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent.gguf", "--port", str(port)])
    assert isinstance(result.exception, LongKVError), result.output
    assert f"port {port} on 127.0.0.1 is in use" in str(result.exception) and "--port" in str(result.exception)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": MODEL_ID, "prompt": ""}, 400),
        ({"model": MODEL_ID, "prompt": []}, 400),
        ({"model": MODEL_ID, "prompt": [10**9]}, 400),
        ({"model": MODEL_ID, "prompt": ["a", "b"]}, 400),
        ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 0}, 400),
        ({"model": MODEL_ID, "prompt": "hi", "echo": True}, 400),
        ({"model": MODEL_ID, "prompt": {"text": "hi"}}, 400),
    ],
)
def test_bad_completion_requests(server: ServerProcess, body: dict, status: int) -> None:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_unknown_routes_and_methods(server: ServerProcess, client: openai.OpenAI) -> None:
    r = httpx.get(server.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/chat/completions", timeout=5)
    assert r.status_code == 405 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------- load, disconnects


LONG = {"longkv": {"cache": False}}  # long prompts below are never cached: every run prefills all of it


def long_messages(start: int = 10_000) -> list[dict]:
    return [{"role": "user", "content": book(26_000, start) + "\n\nSummarize the text above."}]


def test_disconnect_during_prefill_stops_within_a_second(server: ServerProcess, client: openai.OpenAI) -> None:
    stream = chat(client, long_messages(), LONG, stream=True, max_tokens=8)
    first = next(iter(stream))  # the role chunk: the engine took the job and is prefilling
    assert first.choices[0].delta.role == "assistant"
    time.sleep(0.5)
    assert health(server)["running"] == 1
    t0 = time.perf_counter()
    stream.close()
    wait_idle(server, 5.0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"still running {elapsed:.2f} s after the disconnect"
    assert metric(server, "longkv_requests_cancelled_total") >= 1


def test_disconnect_during_decode_stops_within_a_second(server: ServerProcess, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Count from one to one thousand."}]
    stream = chat(client, msgs, salted(ignore_eos=True), stream=True, max_tokens=4000)
    it = iter(stream)
    got = [next(it) for _ in range(4)]  # role chunk, then tokens: decoding
    assert any(c.choices[0].delta.content for c in got[1:])
    t0 = time.perf_counter()
    stream.close()
    wait_idle(server, 5.0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"still running {elapsed:.2f} s after the disconnect"


def test_non_streaming_disconnect_stops_within_a_second(server: ServerProcess) -> None:
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, long_messages(40_000), LONG, max_tokens=8)
    t0 = time.perf_counter()
    wait_idle(server, 5.0)
    assert time.perf_counter() - t0 < 1.0


def test_full_queue_answers_429_and_health_stays_responsive(server: ServerProcess, client: openai.OpenAI) -> None:
    running = [chat(client, long_messages(s), LONG, stream=True, max_tokens=8) for s in (60_000, 100_000)]
    for r in running:
        next(iter(r))  # both in the batch, prefilling together
    # a stream's headers come back once the engine admits it: the waiting one blocks in its own thread
    waiter = threading.Thread(target=lambda: chat(client, long_messages(80_000), LONG, stream=True, max_tokens=8).close())
    waiter.start()
    for _ in range(5):
        t = time.perf_counter()
        h = health(server)
        assert time.perf_counter() - t < 1.0
        time.sleep(0.1)
    assert h["running"] == 2 and h["queued"] == 1
    with pytest.raises(openai.RateLimitError) as e:
        chat(client, [{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["type"] == "rate_limit_error"
    for r in running:
        r.close()
    waiter.join(60)  # admitted once a place is free, then closed by its client
    assert not waiter.is_alive()
    assert wait_idle(server, 5.0) < 1.0
    assert metric(server, "longkv_active_kv_bytes") == 0  # every cancelled sequence let go of its KV
    t = time.perf_counter()
    r = chat(client, [{"role": "user", "content": "hi"}], salted(), max_tokens=2)  # the slot is free again
    assert r.usage.completion_tokens >= 1 and time.perf_counter() - t < 30


def test_concurrent_decodes_share_one_batch(server: ServerProcess, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Count from one to one thousand."}]
    streams = [chat(client, msgs, salted(ignore_eos=True), stream=True, max_tokens=400) for _ in range(2)]
    its = [iter(s) for s in streams]
    for it in its:
        next(it), next(it)  # the role chunk and a first token: both decoding
    sizes = []
    for _ in range(10):
        sizes.append(metric(server, "longkv_batch_size"))
        time.sleep(0.05)
    for s in streams:
        s.close()
    assert 2 in sizes  # one forward fed both sequences
    wait_idle(server, 5.0)


def test_a_short_request_is_answered_during_a_long_prefill(client: openai.OpenAI) -> None:
    long = chat(client, long_messages(120_000), LONG, stream=True, max_tokens=4)
    it = iter(long)
    next(it)  # the long prompt is prefilling
    t = time.perf_counter()
    short = chat(client, [{"role": "user", "content": "Say hi."}], salted(), max_tokens=2)
    waited = time.perf_counter() - t
    rest = list(it)  # the long one finishes after the short one
    assert short.usage.completion_tokens >= 1 and rest[-1].choices[0].finish_reason is not None
    assert waited < 10.0, f"the short request waited {waited:.1f} s behind the long prefill"


def test_quantized_and_plain_dense_kv_never_meet(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Name three planets of the solar system."}]
    salt = uuid.uuid4().hex
    q = chat(client, msgs, {"longkv": {"cache_salt": salt, "policy": "dense:kv_quant=int4"}}, max_tokens=8)
    plain = chat(client, msgs, {"longkv": {"cache_salt": salt}}, max_tokens=8)
    cold = chat(client, msgs, {"longkv": {"cache": False}}, max_tokens=8)
    assert q.usage.completion_tokens >= 1 and q.usage.prompt_tokens_details.cached_tokens == 0
    assert plain.usage.prompt_tokens_details.cached_tokens == 0  # nothing of the int4 run was shared
    assert plain.choices[0].message.content == cold.choices[0].message.content


def test_serve_without_its_extra_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from typer.testing import CliRunner

    from longkv.cli import app
    from longkv.errors import LongKVError

    monkeypatch.setitem(sys.modules, "longkv.server.app", None)  # as if fastapi were not installed
    result = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert isinstance(result.exception, LongKVError)
    assert "pip install 'longkv[serve]'" in str(result.exception)


def test_serve_with_a_bad_default_policy_fails_before_loading() -> None:
    from typer.testing import CliRunner

    from longkv.cli import app
    from longkv.errors import LongKVError

    result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent.gguf", "--policy", "nonsense"])
    assert isinstance(result.exception, LongKVError) and "unknown policy 'nonsense'" in str(result.exception)


def test_sigterm_gives_running_streams_a_grace_then_an_error_event() -> None:
    """A stream still running when the grace period (--shutdown-timeout) ends gets an error event that says the
    server is shutting down, not a connection cut mid-message; the server then exits."""
    with ServerProcess(smollm2_path(), "--dtype", "float32", "--shutdown-timeout", "1", "--log-level", "warning") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = c.completions.create(
            model=MODEL_ID, prompt="Count from one to one thousand:", max_tokens=2000, stream=True, extra_body={"longkv": {"ignore_eos": True}}
        )
        it = iter(stream)
        next(it), next(it)  # decoding
        assert s.proc is not None
        t0 = time.perf_counter()
        s.proc.terminate()
        with pytest.raises(openai.APIError) as e:
            for _ in it:
                pass
        assert "the server is shutting down" in str(e.value.message)
        assert 0.8 < time.perf_counter() - t0 < 10
        assert s.proc.wait(15) in (0, -15)  # uvicorn raises the signal it caught again once it is done: a SIGTERM death
