"""End to end: SmolLM2-135M (trained window 8 K) finds a needle 16 K tokens back with block_topk (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOOK = SHARED / "data" / "books" / "moby-dick.txt"
MODEL = Path.home() / ".cache" / "longkv-test-models" / "smollm2-135m.gguf"


@pytest.mark.slow
def test_smollm2_answers_a_needle_at_16k_beyond_its_window() -> None:
    if not BOOK.exists():
        pytest.skip("../shared/data/books is absent: no real text to build the haystack")
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is absent: no real SmolLM2 to test with")
    from longkv import LLM

    llm = LLM(model=MODEL, dtype="bfloat16")
    hay = llm.encode(BOOK.read_text()[200_000:300_000])[:16_500]
    cut = len(hay) // 3
    text = llm.tokenizer.decode(hay[:cut]) + " The secret number is 730412. " + llm.tokenizer.decode(hay[cut:])
    question = "What is the secret number mentioned in the text above? Answer with the number only."
    prompt = llm.apply_chat_template([{"role": "user", "content": text + "\n\n" + question}])
    assert len(llm.encode(prompt)) > 2 * llm.config.max_position  # far beyond the trained window
    out = llm.generate(prompt, max_new_tokens=20, policy="block_topk")
    assert "730412" in out.text
    assert out.stats.policy.startswith("block_topk")
    # the baseline without retrieval (sinks + the same window) cannot see the needle
    local = llm.generate(prompt, max_new_tokens=20, policy="block_topk:topk=0")
    assert "730412" not in local.text
