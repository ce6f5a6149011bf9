"""Policies of the engine issue: dense and streaming (sinks + local window), and the spec parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longkv import LLM, StreamingPolicy, make_policy
from longkv.config import EngineConfig
from longkv.engine.runner import Runner
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.policies import DensePolicy


def _layer(n: int) -> LayerKV:
    layer = LayerKV(1, 2, page_size=4)
    pos = torch.arange(n)
    layer.append(torch.zeros(1, n, 2), torch.zeros(1, n, 2), pos)
    return layer


def test_streaming_keeps_sinks_and_window_exactly() -> None:
    pol = StreamingPolicy(budget=10, sinks=3)
    layer = _layer(40)
    pol.compress(0, layer)
    assert layer.view()[2].tolist() == [0, 1, 2, *range(33, 40)]
    # the generic top-k over score() picks the same set
    layer2 = _layer(40)
    scores = pol.score(0, *layer2.view(), None)
    assert sorted(torch.topk(scores, 10).indices.tolist()) == [0, 1, 2, *range(33, 40)]


def test_streaming_positions_are_contiguous_in_cache() -> None:
    pol = StreamingPolicy(budget=10, sinks=3)
    kept = torch.tensor([0, 1, 2, *range(33, 40)])
    target = pol.key_positions(kept)
    assert target is not None
    assert target.tolist() == list(range(30, 40))  # sinks sit just before the window
    assert pol.key_positions(torch.arange(5, 15)) is None  # no gap: nothing moves


def test_policy_spec_parser() -> None:
    pol = make_policy("streaming:budget=2k,sinks=8")
    assert isinstance(pol, StreamingPolicy) and pol.budget == 2000 and pol.sinks == 8
    assert make_policy("streaming", budget=512).budget == 512
    assert isinstance(make_policy("dense"), DensePolicy)
    with pytest.raises(LongKVError, match="unknown policy 'h3o'"):
        make_policy("h3o")
    with pytest.raises(LongKVError, match=r"no knob 'sink': did you mean streaming:sinks=\.\.\.\?.*\(e\.g\. streaming:budget=4096\)"):
        make_policy("streaming:sink=4")
    with pytest.raises(LongKVError, match="bad value 'lots' for streaming.budget: expected a whole number such as streaming:budget=4096"):
        make_policy("streaming:budget=lots")


def test_streaming_validation_errors(smollm2_f32: LLM) -> None:
    cfg = smollm2_f32.config
    with pytest.raises(LongKVError, match="below sinks 4 \\+ window 100"):
        StreamingPolicy(budget=50, sinks=4, window=100).resolve(cfg, EngineConfig())
    with pytest.raises(LongKVError, match="budget 4 leaves no local window after 4 sink tokens: raise the budget to at least 5"):
        StreamingPolicy(budget=4, sinks=4).resolve(cfg, EngineConfig())
    with pytest.raises(LongKVError, match="sinks must be >= 0"):
        StreamingPolicy(budget=100, sinks=-1).resolve(cfg, EngineConfig())
    with pytest.raises(LongKVError, match="exceeds the model's trained window of 8192"):
        StreamingPolicy(budget=8000).resolve(cfg, EngineConfig(chunk_size=512))


def test_streaming_bounds_kv_memory_on_a_long_input(tiny_llama: Path) -> None:
    """Peak KV never exceeds budget + chunk tokens per layer, whatever the input length."""
    llm = LLM(model=tiny_llama, dtype="float32", chunk_size=64)
    pol = StreamingPolicy(budget=128, sinks=4)
    ids = torch.randint(0, 300, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate(ids, max_new_tokens=100, policy=pol, ignore_eos=True)
    c = llm.config
    per_token = 2 * c.n_kv_heads * c.head_dim * 4 + 8  # K + V float32 + int64 position
    bound = c.n_layers * (128 + 64) * per_token
    assert out.stats.peak_kv_bytes == bound  # reserved exactly once, never grown
    assert len(out.token_ids) == 100


def test_streaming_answers_far_beyond_the_window(smollm2_bf16: LLM, book_text: str) -> None:
    """9 K tokens (past the 8 K trained window) under streaming: the answer from the recent text is exact."""
    story = (book_text * 2)[: 9000 * 4]
    question = "\n\nThe password of the day is 58213.\n\nWhat is the password of the day? Answer with the number."
    prompt = smollm2_bf16.apply_chat_template([{"role": "user", "content": story + question}])
    ids = smollm2_bf16.encode(prompt)
    assert len(ids) > smollm2_bf16.config.max_position
    out = smollm2_bf16.generate(ids, max_new_tokens=12, policy="streaming:budget=1024")
    assert "58213" in out.text
    assert out.stats.policy.startswith("streaming(budget=1024")


def test_dense_beyond_the_window_is_a_clear_error(smollm2_bf16: LLM) -> None:
    with pytest.raises(LongKVError, match="use the block_topk policy"):
        smollm2_bf16.generate(list(range(100, 8300)), policy="dense", max_new_tokens=4)


def test_runner_reserve_for_dense_is_exact(smollm2_f32: LLM) -> None:
    runner = Runner(smollm2_f32.model, DensePolicy(), EngineConfig())
    seq = runner.new_sequence(130)
    assert seq.cache[0].capacity == 192  # 130 rounded up to 64-token pages
