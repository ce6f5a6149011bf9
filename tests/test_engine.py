"""The LLM class: generation, stop conditions, stats, streaming text."""

from __future__ import annotations

from pathlib import Path

import pytest

from longkv import LLM, LongKVError


@pytest.fixture(scope="module")
def tiny(tiny_qwen2: Path) -> LLM:
    return LLM(model=tiny_qwen2, dtype="float32", chunk_size=128)


def test_greedy_is_deterministic_and_counts_tokens(tiny: LLM) -> None:
    a = tiny.generate("The quick brown fox", max_new_tokens=20, ignore_eos=True)
    b = tiny.generate("The quick brown fox", max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    assert a.finish_reason == "length"
    assert a.text == tiny.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    st = a.stats
    assert st.prompt_tokens == len(tiny.encode("The quick brown fox"))
    assert st.generated_tokens == 20 and st.prefill_s > 0 and st.decode_s > 0 and st.ttft_s >= st.prefill_s
    assert st.peak_kv_bytes > 0 and st.policy == "dense"


def test_seeded_sampling_reproduces(tiny: LLM) -> None:
    a = tiny.generate("Alice was", max_new_tokens=15, temperature=1.0, seed=3, ignore_eos=True)
    b = tiny.generate("Alice was", max_new_tokens=15, temperature=1.0, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_stop_string_cuts_the_text(tiny: LLM) -> None:
    full = tiny.generate("The quick", max_new_tokens=30, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = tiny.generate("The quick", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_streamed_pieces_join_to_the_text(tiny: LLM) -> None:
    pieces: list[str] = []
    out = tiny.generate("def main", max_new_tokens=25, ignore_eos=True, on_text=pieces.append)
    assert "".join(pieces) == out.text and len(pieces) > 1


def test_eos_stops_generation(smollm2_bf16: LLM) -> None:
    out = smollm2_bf16.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=200)
    assert out.finish_reason == "stop" and 0 < len(out.token_ids) < 200


def test_bad_inputs_raise_clear_errors(tiny: LLM) -> None:
    with pytest.raises(LongKVError, match="prompt is empty"):
        tiny.generate("", max_new_tokens=4)
    with pytest.raises(LongKVError, match="no messages"):
        tiny.chat([])
    with pytest.raises(LongKVError, match="exceeds the model's trained window of 512"):
        tiny.generate(list(range(500)), max_new_tokens=20, policy="dense")


def test_auto_policy_switches_to_streaming_beyond_the_window(tiny: LLM) -> None:
    assert tiny.resolve_policy(100).name == "dense"
    pol = tiny.resolve_policy(5000)
    assert pol.name == "streaming" and pol.budget_tokens == 512 - 128  # budget + chunk fits the window
