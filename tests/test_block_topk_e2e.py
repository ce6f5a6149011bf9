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


def test_smollm2_retrieval_heads_rank_the_needle_page_first(smollm2_bf16, book_text: str) -> None:
    # heads=auto resolves to SmolLM2's calibrated retrieval heads, and they point at the fact asked for
    import dataclasses

    from longkv.engine.runner import Runner
    from longkv.policies import BlockTopKPolicy
    from longkv.policies.retrieval_heads import KNOWN, fingerprint, resolve_heads

    llm = smollm2_bf16
    assert resolve_heads("auto", llm.config) == list(KNOWN[fingerprint(llm.config)])
    hay = llm.encode(book_text[20_000:80_000])[:6000]
    cut = len(hay) // 2
    needle = " The code to open the vault is 580133. "
    text = llm.tokenizer.decode(hay[:cut]) + needle + llm.tokenizer.decode(hay[cut:])
    question = "What is the code to open the vault mentioned in the text above? Answer with the number only."
    prompt = llm.apply_chat_template([{"role": "user", "content": text + "\n\n" + question}])
    ids = llm.encode(prompt)
    head = llm.encode(prompt[: prompt.index(needle)])
    page = len(head) // llm.engine_config.page_size  # the needle starts in this page (or the next)
    pol = BlockTopKPolicy(heads="auto", reencode=False)
    split = pol.question_start(len(ids))
    runner = Runner(llm.model, dataclasses.replace(pol, topk=0), llm.engine_config)
    seq = runner.new_sequence(len(ids))
    runner.prefill(seq, ids[:split])
    Runner(llm.model, pol, llm.engine_config).ask(seq, ids[split:])
    st = seq.selection
    best = int(st.candidates[st.score.argmax()])
    assert best in (page, page + 1), (best, page)
    assert best in st.pages[0][0].tolist()
