"""KV memory through the server: ``"longkv": {"session": ..., "memory": {...}}`` on chat requests.

In process (FastAPI's TestClient), a tiny random Llama (512-token window) in float32:
spans reported per message, the next turn reusing the session's KV, tool results
compressed once read, spans dropped on request or when the client leaves them out,
a run far past the window that never overflows, snapshots that come back from disk
with the same answers, and every bad input a 400 with its reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from longkv import LLM
from longkv.server.app import create_app
from longkv.server.worker import ServerConfig

TOOL = "The quick brown fox jumps over the lazy dog. " * 12  # ~150 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=tiny_llama, dtype="float32", chunk_size=32)


@pytest.fixture()
def client(llm: LLM, tmp_path: Path) -> Iterator[TestClient]:
    cfg = ServerConfig(model_id="tiny", cache_bytes=1 << 20, memory_dir=tmp_path / "sessions")
    with TestClient(create_app(llm, cfg)) as c:
        yield c


def chat(client: TestClient, messages: list[dict[str, Any]], memory: dict[str, Any] | None = None, session: str = "run-1", **kw: Any) -> dict:
    body = {
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0,
        "longkv": {"ignore_eos": True, "session": session, "memory": {} if memory is None else memory}, **kw,
    }  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def reply(out: dict) -> dict:
    return {"role": "assistant", "content": out["choices"][0]["message"]["content"]}


def start() -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are a careful agent."}, {"role": "user", "content": "Alice was beginning to get very tired."}]


def test_spans_reuse_compression_and_drops_over_turns(client: TestClient, llm: LLM) -> None:
    msgs = start()
    one = chat(client, msgs)
    m1 = one["longkv"]["memory"]
    assert m1["source"] == "new" and one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert [(s["kind"], s["pinned"]) for s in m1["spans"]] == [("system", True), ("user", True), ("assistant", False)]
    prompt = llm.prompt_ids(llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    assert sum(s["tokens"] for s in m1["spans"]) == m1["logical_tokens"] == len(prompt) + 5  # the 6th token is not fed
    plain = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 6, "temperature": 0, "longkv": {"ignore_eos": True}}).json()
    assert one["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]  # turn 1 is dense

    msgs += [reply(one), {"role": "tool", "content": TOOL, "tool_call_id": "c1"}]
    two = chat(client, msgs)
    m2 = two["longkv"]["memory"]
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(prompt)
    assert [s["kind"] for s in m2["spans"]] == ["system", "user", "assistant", "tool", "assistant"]  # a reply rendered anew stays one span
    tool = next(s for s in m2["spans"] if s["kind"] == "tool")
    assert tool["kept"] == tool["tokens"] > 64 and not any("compress" in e for e in m2["edits"])  # read whole by this step

    msgs += [reply(two), {"role": "user", "content": "def main(): pass"}]
    three = chat(client, msgs)
    m3 = three["longkv"]["memory"]
    squeezed = next(s for s in m3["spans"] if s["id"] == tool["id"])
    assert squeezed["kept"] == -(-tool["tokens"] // 2) and {"compress": tool["id"], "tokens": tool["tokens"] - squeezed["kept"]} in m3["edits"]
    assert m3["kv_tokens"] == m3["logical_tokens"] - (tool["tokens"] - squeezed["kept"])
    assert three["usage"]["prompt_tokens_details"]["cached_tokens"] >= sum(s["kept"] for s in m3["spans"] if s["id"] <= tool["id"])

    # the client leaves the tool result out: its span is cut from the KV, nothing prefilled again
    kept = [m for m in msgs if m["role"] != "tool"] + [reply(three), {"role": "user", "content": "The lazy dog."}]
    four = chat(client, kept)
    m4 = four["longkv"]["memory"]
    assert {"align": [tool["id"]]} in m4["edits"] and all(s["kind"] != "tool" for s in m4["spans"])

    # an explicit drop of the last reply, by id
    last = m4["spans"][-1]["id"]
    five = chat(client, [*kept, reply(four), {"role": "user", "content": "Again."}], memory={"drop": [last]})
    assert {"drop": [last], "tokens": m4["spans"][-1]["kept"]} in five["longkv"]["memory"]["edits"]


def test_new_sessions_take_their_first_message_from_the_prefix_cache(llm: LLM) -> None:
    """Sessions that open with the same system message (an agent's instructions and tools) prefill it once: the
    first session puts its KV in the prefix cache, each later new session attaches it (and counts it as cached)
    and answers as on a server without a cache, also after a session that shares it compressed and cut its own
    KV. A plain request starting with it hits it too; a request that opts out of the cache does not."""
    system = {"role": "system", "content": "You are a careful agent that reads files and answers briefly. " * 4}

    def task(text: str) -> list[dict[str, Any]]:
        return [system, {"role": "user", "content": text}]

    with TestClient(create_app(llm, ServerConfig(model_id="tiny", cache_bytes=1 << 22))) as c, \
            TestClient(create_app(llm, ServerConfig(model_id="tiny", cache_bytes=0))) as cold:
        a = chat(c, task("Alice was beginning to get very tired."), session="a")
        head = a["longkv"]["memory"]["spans"][0]
        assert (head["kind"], head["pinned"], a["usage"]["prompt_tokens_details"]["cached_tokens"]) == ("system", True, 0)
        msgs = task("Down the rabbit hole.")
        b = chat(c, msgs, session="b")
        assert b["longkv"]["memory"]["source"] == "new" and b["usage"]["prompt_tokens_details"]["cached_tokens"] == head["tokens"]
        assert b["longkv"]["memory"]["spans"][0] == {**head, "id": 1}
        assert b["choices"] == chat(cold, msgs, session="b")["choices"]
        for step in range(3):  # session b goes on: its tool results are compressed, its KV rewritten past the head
            msgs += [reply(b), {"role": "tool", "content": f"step {step}: " + TOOL, "tool_call_id": f"t{step}"}]
            b, b_cold = chat(c, msgs, session="b"), chat(cold, msgs, session="b")
            assert b["choices"] == b_cold["choices"] and b["longkv"]["memory"]["edits"] == b_cold["longkv"]["memory"]["edits"]
        assert any("compress" in e for e in b["longkv"]["memory"]["edits"])
        d = chat(c, task("The White Rabbit was late."), session="d")
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == head["tokens"]
        assert d["choices"] == chat(cold, task("The White Rabbit was late."), session="d")["choices"]
        plain = {"model": "tiny", "messages": task("Why is a raven like a writing desk?"), "max_tokens": 4, "temperature": 0}
        hit = c.post("/v1/chat/completions", json=plain).json()
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] >= head["tokens"] - 2
        body = {"model": "tiny", "messages": task("Off with his head."), "max_tokens": 4, "temperature": 0,
                "longkv": {"session": "f", "memory": {}, "cache": False}}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, r.text


def test_a_long_plain_chat_beside_sessions_reads_its_deep_prefix_and_a_failed_admission_spares_the_server(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain chat of many turns, served beside a KV memory session, reads its prefix back from a radix path
    deeper than the pages it attaches in place (the rest is copied in); a bug while admitting one request fails
    that request alone (HTTP 500) and the next is served."""
    chat(client, start(), session="s")
    msgs = start()
    for turn in range(7):
        out = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 3, "temperature": 0}).json()
        if turn:
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, out
        msgs += [reply(out), {"role": "user", "content": f"Turn {turn}: and then?"}]

    from longkv.kv import radix

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(radix.PrefixCache, "load", broken)
    r = TestClient(client.app, raise_server_exceptions=False).post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 3})
    assert r.status_code == 500, r.text
    monkeypatch.undo()
    again = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 3})
    assert again.status_code == 200 and again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_run_far_past_the_window_never_overflows(client: TestClient) -> None:
    msgs = start()
    logical, edits = [], []
    for step in range(8):  # 8 tool results of ~150 tokens: ~1.5 K tokens of text on a 512-token window
        out = chat(client, msgs, session="long")
        m = out["longkv"]["memory"]
        assert m["kv_tokens"] < 512 and [s["pinned"] for s in m["spans"][:2]] == [True, True]  # the prompt, the reply fed
        logical.append(m["logical_tokens"])
        edits += m["edits"]
        msgs += [reply(out), {"role": "tool", "content": f"step {step}: " + TOOL, "tool_call_id": f"c{step}"}]
    assert logical[-1] > 1200 and all(any(k in e for e in edits) for k in ("compress", "stub", "drop"))
    # the whole history sent to a new session: fed message by message, compressed and cut as it goes
    fresh = chat(client, msgs, session="fresh")["longkv"]["memory"]
    assert fresh["source"] == "new" and fresh["kv_tokens"] < 512 and fresh["logical_tokens"] > 1200
    assert sum("prefill" in e for e in fresh["edits"]) >= 8 and any("drop" in e for e in fresh["edits"])


def test_a_saved_session_comes_back_from_disk_with_the_same_answers(llm: LLM, tmp_path: Path) -> None:
    import shutil

    folder, copy = tmp_path / "kv", tmp_path / "kv-after-first"
    msgs = [*start(), {"role": "assistant", "content": "The quick brown fox."}, {"role": "tool", "content": TOOL, "tool_call_id": "c"}]
    follow = [{"role": "assistant", "content": "The lazy dog."}, {"role": "user", "content": "def main(): pass"}]
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", memory_dir=folder))) as c:
        first = chat(c, msgs, memory={"save": True}, session="s/1")
        saved = first["longkv"]["memory"]["saved_bytes"]
        assert saved > 0 and [p.stat().st_size for p in folder.iterdir()] == [saved]
        shutil.copytree(folder, copy)
        warm = chat(c, [*msgs, reply(first), *follow], session="s/1")
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", memory_dir=copy))) as c:  # a new server process
        back = chat(c, [*msgs, reply(first), *follow], session="s/1")
    assert back["longkv"]["memory"]["source"] == "disk" and warm["longkv"]["memory"]["source"] == "ram"
    assert back["choices"] == warm["choices"] and back["usage"] == warm["usage"]
    assert back["longkv"]["memory"]["spans"] == warm["longkv"]["memory"]["spans"]
    # the first server saved its idle sessions when it stopped: the session as the warm request left it
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", memory_dir=folder))) as c:
        nxt = chat(c, [*msgs, reply(first), *follow, reply(warm), {"role": "user", "content": "Again."}], session="s/1")
    m = nxt["longkv"]["memory"]
    assert m["source"] == "disk" and [s["id"] for s in m["spans"]][: len(warm["longkv"]["memory"]["spans"])] == [
        s["id"] for s in warm["longkv"]["memory"]["spans"]
    ]


def test_a_snapshot_saved_with_other_settings_starts_the_session_afresh(llm: LLM, tiny_llama: Path, tmp_path: Path) -> None:
    """Not a 400 on every later request: the session starts new (the prompt holds the history), the reply says
    why without the server's paths, and the next save replaces the file."""
    folder = tmp_path / "kv"
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", memory_dir=folder))) as c:
        chat(c, start(), memory={"save": True}, session="s")
        (folder / f"d-{hashlib.sha256(b'd').hexdigest()[:12]}.kv").write_bytes(b"not a snapshot")  # session d's file, damaged
        damaged = chat(c, start(), session="d")["longkv"]["memory"]
        assert damaged["source"] == "new" and damaged["stale_snapshot"].startswith("its snapshot is not a longkv session snapshot")
    other = LLM(model=tiny_llama, dtype="bfloat16", chunk_size=32)  # another dtype: another fingerprint
    with TestClient(create_app(other, ServerConfig(model_id="tiny", memory_dir=folder))) as c:
        out = chat(c, start(), memory={"save": True}, session="s")
        m = out["longkv"]["memory"]
        assert m["source"] == "new" and "its snapshot was saved with another model file or settings" in m["stale_snapshot"] and "bfloat16" in m["stale_snapshot"]
        assert str(folder) not in out["longkv"]["memory"]["stale_snapshot"]
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    with TestClient(create_app(other, ServerConfig(model_id="tiny", memory_dir=folder))) as c:  # the save replaced it
        again = chat(c, [*start(), reply(out), {"role": "user", "content": "Again."}], session="s")
    assert again["longkv"]["memory"]["source"] == "disk" and "stale_snapshot" not in again["longkv"]["memory"]


@pytest.mark.parametrize(
    ("longkv", "message"),
    [
        ({"memory": {}}, "longkv.memory needs a session"),
        ({"session": "x", "memory": {"drop": [99]}}, "no span 99 in this session"),
        ({"session": "x", "memory": {}, "policy": "snapkv:budget=64"}, "KV memory runs under the dense policy"),
        ({"session": "x", "memory": {"tool_keep": 1.5}}, "tool_keep"),
        ({"session": "x", "memory": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_memory_requests_are_400s_with_the_reason(client: TestClient, longkv: dict, message: str) -> None:
    body = {"model": "tiny", "messages": start(), "max_tokens": 4, "longkv": longkv}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and message in r.text, r.text


def test_pinned_spans_cannot_be_dropped_and_saving_needs_a_folder(llm: LLM, client: TestClient) -> None:
    out = chat(client, start(), session="p")
    pinned = out["longkv"]["memory"]["spans"][0]["id"]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": start(), "max_tokens": 4, "longkv": {"session": "p", "memory": {"drop": [pinned]}}})
    assert r.status_code == 400 and "is pinned" in r.text
    again = chat(client, start(), session="p")  # the refused edit changed nothing
    assert again["longkv"]["memory"]["spans"][:2] == out["longkv"]["memory"]["spans"][:2]
    with TestClient(create_app(llm, ServerConfig(model_id="tiny"))) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": start(), "max_tokens": 4, "longkv": {"session": "q", "memory": {"save": True}}})
    assert r.status_code == 400 and "--memory-dir" in r.text


def test_idle_sessions_past_the_ram_budget_go_to_disk_and_come_back(llm: LLM, tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", memory_dir=folder, memory_bytes=1))) as c:
        a = chat(c, start(), session="a")
        chat(c, start(), session="b")  # pushes "a" (and then "b") out of RAM, to the folder
        assert len(list(folder.iterdir())) == 2
        again = chat(c, [*start(), reply(a), {"role": "user", "content": "Again."}], session="a")
        metrics = c.get("/metrics").text
    assert again["longkv"]["memory"]["source"] == "disk"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= a["longkv"]["memory"]["kv_tokens"] - 6
    assert "longkv_memory_loaded 1.0" in metrics and "longkv_memory_sessions" in metrics


def test_a_failed_save_is_reported_and_the_session_kept(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from longkv.engine.memory import KVMemory

    def full(self: KVMemory, path: object, fingerprint: str = "") -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(KVMemory, "save", full)
    out = chat(client, start(), memory={"save": True}, session="f")
    assert "No space left on device" in out["longkv"]["memory"]["save_error"]
    monkeypatch.undo()
    again = chat(client, [*start(), reply(out), {"role": "user", "content": "Again."}], session="f")
    assert again["longkv"]["memory"]["source"] == "ram" and again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_pinned_messages_past_the_window_are_refused_at_once_and_make_no_session(client: TestClient) -> None:
    huge = [{"role": "system", "content": TOOL * 4}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": huge, "max_tokens": 4, "longkv": {"session": "h", "memory": {}}})
    assert r.status_code == 400 and "the system prompt and task (" in r.text and "never dropped" in r.text, r.text
    assert chat(client, start(), session="h")["longkv"]["memory"]["source"] == "new"
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": start(), "max_tokens": 4,
                                                  "longkv": {"session": "u", "memory": {"drop": [3]}}})  # fmt: skip
    assert r.status_code == 400 and "no span 3" in r.text
    assert chat(client, start(), session="u")["longkv"]["memory"]["source"] == "new"


def test_a_second_request_on_a_busy_session_is_a_409(client: TestClient) -> None:
    import threading
    import time

    long = {"model": "tiny", "messages": start(), "max_tokens": 300, "longkv": {"ignore_eos": True, "session": "busy", "memory": {}}}
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(client.post("/v1/chat/completions", json=long).status_code))
    t.start()
    deadline = time.monotonic() + 30
    while client.get("/health").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    r = client.post("/v1/chat/completions", json={**long, "max_tokens": 2})
    t.join()
    assert done == [200] and r.status_code == 409 and "is answering another request" in r.text and "session_busy" in r.text


def test_a_reply_whose_start_the_session_holds_whole_stays_one_span(client: TestClient) -> None:
    """A one-token reply: the session holds its span up to the generation prompt (the token is not fed), and the
    next prompt repeats that span whole, then the reply's text and the template's end of the message: they join
    the reply's span (one span per message), not a span of their own."""
    msgs = start()
    one = chat(client, msgs, session="tail", max_tokens=1)
    msgs += [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Go on."}]
    two = chat(client, msgs, session="tail")
    before, after = one["longkv"]["memory"]["spans"], two["longkv"]["memory"]["spans"]
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == one["longkv"]["memory"]["kv_tokens"]  # held whole
    assert [s["kind"] for s in after] == ["system", "user", "assistant", "user", "assistant"]
    assert after[2]["id"] == before[2]["id"] and after[2]["tokens"] > before[2]["tokens"]


def test_a_completion_session_holds_its_prompt_as_text_and_its_continuation_as_a_reply(client: TestClient) -> None:
    body = {"model": "tiny", "prompt": "Alice was beginning to get very tired", "max_tokens": 6, "temperature": 0,
            "longkv": {"ignore_eos": True, "session": "done", "memory": {}}}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    spans = r.json()["longkv"]["memory"]["spans"]
    assert [(s["kind"], s["tokens"]) for s in spans] == [("text", r.json()["usage"]["prompt_tokens"]), ("assistant", 5)]
