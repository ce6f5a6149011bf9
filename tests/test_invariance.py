"""Batch invariance: a sequence's logits are the same bits alone, in any batch, and after a prefix-cache hit.

A tiny random Llama in bfloat16 and float32 with int4 decode weights (the formats the CPU runs by
default), head_dim 32 (the 32-wide attention loops). Every comparison is ``torch.equal``: a token's
products do not depend on what shares its step or its chunk (decode rows through the coded weights
row by row, prompt chunks through W in forwards of their own, padded; prompt chunks on the grid of
the sequence's positions; prefill attention padded to fixed blocks; decode attention in blocks at
fixed offsets of the sequence's keys, chunks merged in order).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_llama_weights, staggered_batches

from longkv import kernels
from longkv.config import EngineConfig, ModelConfig
from longkv.engine.runner import Runner, Sequence
from longkv.engine.step import Work, run_batch
from longkv.kv.pool import KVPools
from longkv.kv.radix import PrefixCache, reuse_length
from longkv.models import build
from longkv.policies import DensePolicy, make_policy

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the guarantee is the CPU kernels'")

CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=128, intermediate_size=256, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=32, max_position=4096, eos_token_ids=(0,),
)  # fmt: skip
WEIGHTS = random_llama_weights(CFG, 0, 0.3)
MODELS = {dtype: build(CFG, {k: v.to(dtype) for k, v in WEIGHTS.items()}, decode_weights="int4") for dtype in (torch.bfloat16, torch.float32)}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])


def _engine(dtype: torch.dtype) -> EngineConfig:
    return EngineConfig(chunk_size=64, page_size=16, dtype=str(dtype).removeprefix("torch."))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _runner(spec: str, dtype: torch.dtype) -> Runner:
    engine = _engine(dtype)
    return Runner(MODELS[dtype], make_policy(spec).resolve(CFG, engine), engine)


def _alone(spec: str, dtype: torch.dtype, prompt: list[int], steps: int) -> list[torch.Tensor]:
    runner = _runner(spec, dtype)
    seq = runner.new_sequence()
    out = [runner.prefill(seq, prompt)]
    for _ in range(steps):
        out.append(runner.decode(seq, int(out[-1].argmax())))
    return out


@DTYPES
@pytest.mark.parametrize("spec", [
    "dense", "streaming:budget=96,sinks=4,positions=original", "dense:kv_quant=int8", "snapkv:budget=96", "adakv:budget=96",
    "kvzip:budget=96", "block_topk:sinks=16,window=64,query_tokens=8,topk=2,dense_below=0",
])  # fmt: skip
def test_each_sequence_of_a_mixed_batch_is_bit_for_bit_itself_alone(spec: str, dtype: torch.dtype) -> None:
    """Prompts of 5 to 330 tokens (chunks of 64 and shorter), arriving two steps apart, so decode tokens share
    steps with prompt chunks; 40 decode steps each, past 256 keys (several attention chunks)."""
    steps = 40
    prompts = [_ids(n, seed=n) for n in (5, 150, 330, 23)]
    want = [_alone(spec, dtype, p, steps) for p in prompts]
    got, batches = staggered_batches(MODELS[dtype], [_runner(spec, dtype) for _ in prompts], prompts, steps)
    mixed = sum(any(w.decode for w in b) and any(not w.decode for w in b) for b in batches)
    assert mixed >= 3  # prompt chunks really shared steps with decode tokens
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for t, (a, b) in enumerate(zip(g, w, strict=True)):
            assert torch.equal(a, b), (spec, i, t, (a - b).abs().max())


@DTYPES
def test_a_prefix_cache_hit_decodes_bit_for_bit_as_the_cold_run(dtype: torch.dtype) -> None:
    """The whole prompt cached (it ends mid-page, so the warm sequence's own tokens start a new page): every
    decode step's logits equal the cold run's."""
    prompt, steps = _ids(45, seed=1), 100
    engine = _engine(dtype)
    runner = Runner(MODELS[dtype], DensePolicy(), engine, KVPools(engine.page_size))  # one pool: a hit attaches its pages
    cold = runner.new_sequence()
    first = runner.prefill(cold, prompt)
    want, tokens = [], []
    lg = first
    for _ in range(steps):
        tokens.append(int(lg.argmax()))
        lg = runner.decode(cold, tokens[-1])
        want.append(lg)
    pc = PrefixCache(1 << 30)
    pc.insert("ns", cold.tokens, cold.cache, {len(prompt): first})
    m = pc.match("ns", prompt)
    assert m.length == len(prompt) and m.logits is not None and torch.equal(m.logits, first)
    warm = runner.new_sequence()
    pc.load(m, warm.cache, m.length)
    warm.tokens = list(prompt)
    for t, (tok, w) in enumerate(zip(tokens, want, strict=True)):
        assert torch.equal(runner.decode(warm, tok), w), t
    runs = warm.cache[0].kernel_runs(dtype)
    assert runs is not None and [n for _, n in runs] == [45, steps]  # the shared pages in place, then its own
    _release(warm, cold, pc)


def _release(*held: Sequence | PrefixCache) -> None:
    for x in held:
        if isinstance(x, PrefixCache):
            x.clear()
        else:
            x.cache.clear()


def test_a_sequence_with_two_works_in_one_batch_is_refused() -> None:
    runner = _runner("dense", torch.float32)
    seq = runner.new_sequence()
    runner.prefill(seq, _ids(10, seed=2))
    with pytest.raises(ValueError, match="a sequence has two works in one batch"):
        run_batch(MODELS[torch.float32], [Work(runner, seq, [1], decode=True), Work(runner, seq, [2], decode=True)])
    assert seq.cache[0].n == 10 and len(seq.tokens) == 10  # nothing ran


@DTYPES
@pytest.mark.parametrize("spec", ["dense", "dense:kv_quant=int8"])
def test_a_partial_prefix_hit_decodes_bit_for_bit_as_the_cold_run(spec: str, dtype: torch.dtype) -> None:
    """An earlier request's prompt is a prefix of this one (a shared system prompt, a document asked twice):
    this prompt resumes after the cached tokens on the chunk grid a cold run uses, each prompt token's
    products the same for any chunk, so its logits after the prompt and at every decode step equal a cold
    run's, whatever the prefix's length (inside a chunk, on its edge, one token short)."""
    engine = _engine(dtype)
    prompt, steps = _ids(150, seed=7), 12
    runner = Runner(MODELS[dtype], make_policy(spec).resolve(CFG, engine), engine, KVPools(engine.page_size))
    cold = runner.new_sequence()
    want = [runner.prefill(cold, prompt)]
    for _ in range(steps):
        want.append(runner.decode(cold, int(want[-1].argmax())))
    cold.cache.clear()
    for k in (2, 31, 63, 64, 65, 100, 128, 148, 149):
        pc = PrefixCache(1 << 30)
        earlier = runner.new_sequence()
        runner.prefill(earlier, prompt[:k])
        pc.insert("ns", earlier.tokens, earlier.cache)
        earlier.cache.clear()
        m = pc.match("ns", prompt)
        reuse = reuse_length(m, len(prompt), engine.chunk_size)
        assert reuse == {63: 62, 65: 64, 149: 148}.get(k, k)  # no lone token at either side of the cut
        warm = runner.new_sequence()
        pc.load(m, warm.cache, reuse)
        warm.tokens = prompt[:reuse]
        got = [runner.prefill(warm, prompt[reuse:])]
        for _ in range(steps):
            got.append(runner.decode(warm, int(got[-1].argmax())))
        for t, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), (k, t, (a - b).abs().max())
        _release(warm, pc)
