"""Question-aware compression on the real model: the question decides what a 25 % budget keeps."""

from __future__ import annotations

import pytest

from longkv import LLM
from longkv.engine.runner import Runner


def test_question_aware_snapkv_keeps_a_far_needle(smollm2_bf16: LLM, book_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = smollm2_bf16
    words = llm.encode(book_text[20000:60000])[:3000]
    needle = llm.encode(" The secret number of Octavia is 73914. ")
    hay = llm.tokenizer.decode(words[:1100] + needle + words[1100:])
    question = "What is the secret number of Octavia? Answer with the number only."
    prompt = llm.apply_chat_template([{"role": "user", "content": hay + "\n\n" + question}]) + "The secret number of Octavia is"
    ids = llm.encode(prompt)
    tail = ids[-(len(llm.encode(question)) + 16) :]
    probes: list[int] = []
    real = Runner.probe_work

    def counting(self: Runner, seq, probe_ids, then):  # type: ignore[no-untyped-def]
        probes.append(len(probe_ids))
        return real(self, seq, probe_ids, then)

    monkeypatch.setattr(Runner, "probe_work", counting)
    budget = len(ids) // 4
    out = llm.generate(ids, max_new_tokens=6, policy=f"snapkv:budget={budget}", question_ids=tail)
    assert "73914" in out.text
    assert probes == [len(tail)] * -(-len(ids) // 512)  # the question, probed after every chunk
    assert out.stats.peak_kv_bytes < 0.45 * llm._kv_bytes_per_token() * len(ids)  # budget + one chunk, not the input
