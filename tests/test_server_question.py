"""``"longkv": {"question": ...}``: a request names its question, and block_topk chooses its pages from it.

In process (FastAPI's TestClient), a tiny random Llama (512-token window) in float32 and a
block_topk spec small enough for it; a spy on the policy's selection reads how many of the
prompt's last tokens the engine passed as the question.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from longkv import LLM
from longkv.policies import BlockTopKPolicy
from longkv.server.app import create_app
from longkv.server.worker import ServerConfig

SPEC = "block_topk:sinks=64,window=128,query_tokens=16,topk=1,margin=0"  # span 512, the tiny window
DOC = " ".join(f"Line {i} of the ledger says the crate holds {i * 7} apples." for i in range(16))  # ~750 tokens
QUESTION = "How many apples does the crate on line 12 hold?"


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=tiny_llama, dtype="float32", chunk_size=64)


@pytest.fixture()
def client(llm: LLM) -> Iterator[TestClient]:
    with TestClient(create_app(llm, ServerConfig(model_id="tiny", cache_bytes=0))) as c:
        yield c


@pytest.fixture()
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """(question tokens the policy was told, the whole prompt) for every selection."""
    out: list[tuple[int, list[int]]] = []
    select = BlockTopKPolicy.select

    def spy(self, state, model, cache, context, ids, ropes):  # type: ignore[no-untyped-def]
        out.append((state.question_tokens, list(context) + list(ids)))
        return (yield from select(self, state, model, cache, context, ids, ropes))

    monkeypatch.setattr(BlockTopKPolicy, "select", spy)
    return out


def post(client: TestClient, path: str, **body: Any) -> Any:
    return client.post(path, json={"model": "tiny", "max_tokens": 2, "temperature": 0, **body})


def starts_at_question(llm: LLM, prompt: list[int], n: int) -> bool:
    """The last ``n`` tokens begin exactly with the question's text (no token of the text before it)."""
    return bool(llm.tokenizer.decode(prompt[-n:]).startswith(QUESTION)) and not llm.tokenizer.decode(prompt[-n - 1 :]).startswith(QUESTION)


def test_a_named_question_chooses_the_pages_on_both_endpoints(client: TestClient, llm: LLM, seen: list) -> None:
    messages = [{"role": "user", "content": f"{DOC}\n\n{QUESTION}"}]
    r = post(client, "/v1/chat/completions", messages=messages, longkv={"policy": SPEC, "question": QUESTION})
    assert r.status_code == 200, r.text
    r = post(client, "/v1/chat/completions", messages=messages, longkv={"policy": SPEC})
    assert r.status_code == 200, r.text
    r = post(client, "/v1/completions", prompt=f"{DOC}\n\n{QUESTION}\nAnswer:", longkv={"policy": SPEC, "question": f"{QUESTION}\nAnswer:"})
    assert r.status_code == 200, r.text
    (named, prompt), (unnamed, _), (text_named, text_prompt) = seen
    assert len(prompt) > 600 and 0 < named < 80 and starts_at_question(llm, prompt, named)  # the question + the template's tail
    assert unnamed == 0  # not named: the policy's last query_tokens choose, as before
    assert 0 < text_named < 80 and starts_at_question(llm, text_prompt, text_named)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"{QUESTION} {DOC}"}]}, "ends the last user message"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": DOC}, {"role": "assistant", "content": QUESTION}]},
         "ends with a user message"),
        ("/v1/completions", {"prompt": [1, 2, 3, 4]}, "needs a text prompt"),
        ("/v1/completions", {"prompt": f"{DOC} {QUESTION} More text."}, "ends the prompt"),
    ],
)
def test_a_question_that_does_not_end_the_prompt_is_a_400(client: TestClient, seen: list, path: str, body: dict, message: str) -> None:
    r = post(client, path, longkv={"policy": SPEC, "question": QUESTION}, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == "longkv.question"
    assert seen == []  # refused before any prefill
    blank = post(client, path, longkv={"policy": SPEC, "question": "   "}, **body)
    assert blank.status_code == 400
