"""A decode step in one kernel call (``LlamaModel.decode_step``, ``kernels.DecodeLayers``): the same logits as
the layer-by-layer forward, bit for bit, and taken only where a batch's every sequence reads plain pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from longkv import LLM, kernels
from longkv.engine.runner import Runner, Sequence
from longkv.engine.step import Work, run_batch
from longkv.policies import BlockTopKPolicy, make_policy

needs_cc = pytest.mark.skipif(not kernels.available(), reason="longkv's CPU kernels are not built here (no C compiler)")


def batch_logits(llm: LLM, one_call: bool, monkeypatch: pytest.MonkeyPatch, prompts: list[list[int]], steps: int,
                 policy: str = "dense", fork: bool = True) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Greedy decode of every prompt in one batch (plus a fork of the first sequence, whose pages it shares
    with it), ``steps`` steps; the logits of every step (steps, B, V) and how many steps took one call."""
    model = llm.model
    calls = 0
    real = model.decode_step

    def spy(*a: object, **kw: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "decode_step", spy)
    if not one_call:
        monkeypatch.setattr(model, "decode_layers", None)
    runner = Runner(model, make_policy(policy), llm.engine_config)
    seqs: list[Sequence] = []
    last: list[int] = []
    for p in prompts:
        seq = runner.new_sequence()
        last.append(int(runner.prefill(seq, p).argmax()))
        seqs.append(seq)
    if fork:
        seqs.append(Sequence(seqs[0].cache.fork(), list(seqs[0].tokens)))
        last.append(last[0] + 1)  # another token after the same prefix
    out = []
    for _ in range(steps):
        logits = run_batch(model, [Work(runner, s, [t], decode=True) for s, t in zip(seqs, last, strict=True)])
        out.append(torch.stack([lg for lg in logits if lg is not None]))
        last = [int(lg.argmax()) for lg in out[-1]]
    monkeypatch.undo()
    if policy == "dense":  # every key kept, at its position: the kernel wrote the positions too
        for seq in seqs:
            assert all(torch.equal(lkv.positions(), torch.arange(len(seq.tokens))) for lkv in seq.cache.layers)
    return torch.stack(out), calls


@needs_cc
def test_one_call_decode_equals_the_layer_by_layer_forward(smollm2_bf16: LLM, book_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sequences (one a fork sharing the first one's pages: two parts, copy on write at its first
    append) over 20 steps, pages filling and new ones taken on the way: equal logits."""
    llm = smollm2_bf16
    assert llm.model.decode_layers is not None  # SmolLM2: every layer has both fused halves
    ids = llm.encode(book_text[:6000])
    prompts = [ids[:150], ids[300:350]]  # 150 + 20 crosses a 64-token page; 50 + 20 too
    fast, calls = batch_logits(llm, True, monkeypatch, prompts, 20)
    slow, none = batch_logits(llm, False, monkeypatch, prompts, 20)
    assert calls == 20 and none == 0
    assert fast.shape == (20, 3, llm.config.vocab_size)
    assert torch.equal(fast, slow)
    single, calls = batch_logits(llm, True, monkeypatch, [ids[:100]], 5, fork=False)  # a batch of one
    alone, _ = batch_logits(llm, False, monkeypatch, [ids[:100]], 5, fork=False)
    assert calls == 5 and torch.equal(single, alone)


@needs_cc
def test_one_call_decode_with_qkv_biases_equals_the_layer_by_layer_forward(tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen2 (q/k/v biases, head_dim 16) with int8 decode weights, in float32 and bfloat16."""
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=tiny_qwen2, dtype=dtype, weights="int8")
        assert llm.model.decode_layers is not None
        prompts = [[5, 9, 33, 2, 7] * 14, [11, 12, 13] * 9]
        fast, calls = batch_logits(llm, True, monkeypatch, prompts, 8)
        slow, _ = batch_logits(llm, False, monkeypatch, prompts, 8)
        assert calls == 8 and torch.equal(fast, slow), dtype


@needs_cc
@pytest.mark.parametrize(
    ("policy", "one_call"),
    [
        ("streaming:budget=96,positions=original", True),  # evicts every few steps; no key moves: the kernel reads what is left
        ("dense:kv_quant=int8", True),  # int8 codes: coded on the way in, read as codes
        ("dense:kv_quant=int4", False),  # int4 codes: decoded before attention
        ("snapkv:budget=96", True),  # keeps queries for its evictions: the kernel hands them back
        ("h2o:budget=96,positions=original", True),
        ("adakv:budget=96", False),  # per-head stores
        ("streaming:budget=96", True),  # contiguous positions: keys move, the kernel turns the query instead
    ],
)
def test_the_one_call_step_only_where_the_pages_are_read_as_they_are(smollm2_bf16: LLM, book_text: str, policy: str, one_call: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Taken or not as the policy and pages allow; the same logits as with it switched off either way (int8
    pages: the same codes written, the same kernel reading them)."""
    llm = smollm2_bf16
    ids = llm.encode(book_text[:3000])
    prompts = [ids[:120], ids[200:260]]
    got, calls = batch_logits(llm, True, monkeypatch, prompts, 12, policy, fork=False)
    want, _ = batch_logits(llm, False, monkeypatch, prompts, 12, policy, fork=False)
    assert calls == (12 if one_call else 0)
    assert torch.equal(got, want)


@needs_cc
def test_models_whose_layers_differ_keep_the_layer_by_layer_step(gemma3_path: Path) -> None:
    """Gemma 3: sliding layers and a forward of its own, so no one-call step."""
    assert LLM(model=gemma3_path).model.decode_layers is None


@needs_cc
@pytest.mark.parametrize(("tokens", "selects"), [(1500, False), (4000, True)])
def test_block_topk_decode_takes_one_call_over_its_prefix_and_window(smollm2_bf16: LLM, book_text: str, tokens: int, selects: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """block_topk's answer: read densely (a prompt within its span), or over the re-encoded pages (rotated to where
    the window sees them) then the window from the anchor: one kernel call per step, the answer the
    layer-by-layer path gives."""
    llm = smollm2_bf16
    doc = llm.tokenizer.decode(llm.encode(book_text)[:tokens])
    question = "Where did Alice fall? Answer in one sentence."

    starts: list[int] = []  # where each one-call read of the cache starts (0: dense; the anchor after a selection)
    parts_of = BlockTopKPolicy.in_place_parts

    def parts_spy(self: BlockTopKPolicy, *a: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        parts, start = parts_of(self, *a)
        starts.append(start)
        assert len(parts) == (1 if start else 0)
        return parts, start

    def answer(one_call: bool) -> tuple[list[int], int]:
        calls = 0
        real = llm.model.decode_step

        def spy(*a: object, **kw: object) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return real(*a, **kw)  # type: ignore[arg-type]

        with monkeypatch.context() as m:
            m.setattr(llm.model, "decode_step", spy)
            m.setattr(BlockTopKPolicy, "in_place_parts", parts_spy)
            if not one_call:
                m.setattr(llm.model, "decode_layers", None)
            g = llm.ask(doc, question, max_new_tokens=16, policy="block_topk", ignore_eos=True)
        return g.token_ids, calls

    fast, calls = answer(True)
    slow, none = answer(False)
    assert calls == 15 and none == 0  # every step after the first token
    assert len(starts) == 15 * llm.config.n_layers and (min(starts) > 0 if selects else max(starts) == 0)
    assert fast == slow


@needs_cc
@pytest.mark.parametrize("policy", ["streaming:budget=40", "snapkv:budget=40", "h2o:budget=40", "snapkv:budget=40,kv_quant=int8"])
def test_renumbered_keys_are_read_in_place_with_the_query_turned(tiny_qwen2: Path, policy: str) -> None:
    """An eviction policy that renumbers what it kept (the default ``positions=contiguous``): the decode kernel
    reads the keys where they were cached and turns the query once per run of one shift, in the one-call
    step and in the layer-by-layer one, alone and in a batch: the logits of rotating the keys to their new
    positions first, to float32 rounding."""
    llm = LLM(model=tiny_qwen2, dtype="float32", weights="int8")
    prompts = [[5, 9, 33, 2, 7] * 14, [11, 12, 13, 4] * 13]  # 70 and 52 tokens over a budget of 40: gaps everywhere
    seen: list[int] = []
    real = Runner._turns_queries

    def spy(q: torch.Tensor, segments: list[Any]) -> bool:
        seen.append(real(q, segments))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runner, "_turns_queries", staticmethod(spy))
        one_call, calls = batch_logits(llm, True, pytest.MonkeyPatch(), prompts, 10, policy, fork=False)
        by_layer, _ = batch_logits(llm, False, pytest.MonkeyPatch(), prompts, 10, policy, fork=False)
        alone, _ = batch_logits(llm, False, pytest.MonkeyPatch(), prompts[:1], 10, policy, fork=False)
    assert seen and all(seen)  # every layer-by-layer decode read went through the kernel, keys in place
    assert calls == 10
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runner, "_turns_queries", staticmethod(lambda q, segments: False))  # keys rotated, then read
        want, _ = batch_logits(llm, False, pytest.MonkeyPatch(), prompts, 10, policy, fork=False)
        want_alone, _ = batch_logits(llm, False, pytest.MonkeyPatch(), prompts[:1], 10, policy, fork=False)
    torch.testing.assert_close(one_call, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_layer, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, want_alone, rtol=1e-4, atol=1e-4)
