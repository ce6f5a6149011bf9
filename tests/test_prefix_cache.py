"""The prefix cache (radix tree of KV), continuation on the step loop and cancellation, on a tiny random model.

No model file needed: a 2-layer llama with random weights, float32. Values are
compared exactly where the computation is the same (a copied prefix, kept logits)
and to 1e-5 where only the chunking differs.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import random_llama_weights

from longkv.config import EngineConfig, ModelConfig
from longkv.engine.engine import Engine, Request, RequestOutput
from longkv.engine.runner import Runner, Sequence
from longkv.engine.sampling import SamplingParams
from longkv.engine.step import Interrupted, run_batch
from longkv.kv.cache import KVCache
from longkv.kv.radix import PrefixCache, shares_dense_kv
from longkv.models import build
from longkv.policies import DensePolicy, StreamingPolicy

CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=1024, eos_token_ids=(0,),
)  # fmt: skip
ENGINE = EngineConfig(chunk_size=16, page_size=8, dtype="float32")



def _kept(seq: Sequence) -> Sequence:
    """What an ``on_release`` hook keeps of a sequence: a copy-on-write fork (the engine frees the original next)."""
    return Sequence(seq.cache.fork(), list(seq.tokens))

def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_llama_weights(CFG, seed, 0.2)


class _Tok:
    """Decodes token t as the letter chr(97 + t % 26) (0 is EOS, skipped)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids if t != 0 or not skip_special_tokens)


@pytest.fixture(scope="module")
def llm() -> types.SimpleNamespace:
    model = build(CFG, _weights())
    return types.SimpleNamespace(model=model, tokenizer=_Tok(), eos_ids=frozenset({0}), engine_config=ENGINE, config=CFG)


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache_with(n: int, seed: int = 0) -> KVCache:
    """A dense cache of n tokens with random K/V (distinct per token)."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(CFG.n_layers, CFG.n_kv_heads, CFG.head_dim, 8)
    for layer in cache.layers:
        layer.append(torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g), torch.arange(n))
    return cache


def _empty() -> KVCache:
    return KVCache(CFG.n_layers, CFG.n_kv_heads, CFG.head_dim, 8)


# --------------------------------------------------------------------------- radix tree


def test_match_load_split_and_exact_kv() -> None:
    pc = PrefixCache(1 << 30)
    a, b = [5, 6, 7, 8, 9, 10], [5, 6, 7, 1, 2]
    ca, cb = _cache_with(6, seed=1), _cache_with(5, seed=2)
    assert pc.insert("ns", a, ca) == 6
    m = pc.match("ns", [5, 6, 7, 1])
    assert m.length == 3 and m.logits is None
    assert pc.insert("ns", b, cb) == 2  # only the two new tokens are stored; the edge is split
    assert pc.tokens == 8
    for ids, src in ((a, ca), (b[:3] + b[3:], None)):
        m = pc.match("ns", ids)
        assert m.length == len(ids)
        out = _empty()
        pc.load(m, out, m.length)
        for i, layer in enumerate(out.layers):
            k, v, pos = layer.view()
            assert torch.equal(pos, torch.arange(len(ids)))
            if src is not None:
                assert torch.equal(k, src.layers[i].view()[0]) and torch.equal(v, src.layers[i].view()[1])
            else:  # b's first 3 tokens come from a's KV, the rest from b's
                assert torch.equal(k[:, :3], ca.layers[i].view()[0][:, :3]) and torch.equal(k[:, 3:], cb.layers[i].view()[0][:, 3:5])
    assert pc.match("other", a).length == 0  # namespaces never meet


def test_bytes_accounting_and_lru_eviction() -> None:
    per_token = CFG.n_layers * (2 * CFG.n_kv_heads * CFG.head_dim * 4 + 8)  # K, V and a position per layer
    pc = PrefixCache(10 * per_token)
    pc.insert("ns", [1, 2, 3, 4], _cache_with(4))
    pc.insert("ns", [7, 8, 9, 10], _cache_with(4))
    assert pc.bytes == 8 * per_token
    pc.match("ns", [1, 2])  # touch the first path: the second becomes least recently used
    pc.insert("ns", [20, 21, 22, 23], _cache_with(4))
    assert pc.bytes <= pc.capacity and pc.tokens == 8
    assert pc.match("ns", [7, 8, 9, 10]).length == 0
    assert pc.match("ns", [1, 2, 3, 4]).length == 4 and pc.match("ns", [20, 21, 22, 23]).length == 4
    assert pc.stats.evictions == 1 and pc.stats.evicted_tokens == 4
    assert pc.insert("ns", list(range(30, 50)), _cache_with(20)) == 0  # larger than the whole budget: not stored
    assert pc.tokens == 8


def test_session_pin_survives_eviction_until_only_pins_are_left() -> None:
    per_token = CFG.n_layers * (2 * CFG.n_kv_heads * CFG.head_dim * 4 + 8)  # K, V and a position per layer
    pc = PrefixCache(8 * per_token)
    pc.insert("ns", [1, 2, 3, 4], _cache_with(4), session="s1")
    pc.insert("ns", [5, 6, 7, 8], _cache_with(4))
    pc.match("ns", [5, 6, 7, 8])  # most recently used, but not pinned
    pc.insert("ns", [9, 10, 11, 12], _cache_with(4))
    assert pc.match("ns", [1, 2, 3, 4]).length == 4  # pinned: kept although least recently used
    assert pc.match("ns", [5, 6, 7, 8]).length == 0
    pc.insert("ns", [13, 14, 15, 16], _cache_with(4), session="s2")  # evicts [9..12]
    assert pc.sessions == 2 and pc.match("ns", [9, 10, 11, 12]).length == 0
    pc.insert("ns", [17, 18, 19, 20], _cache_with(4))  # only pins left: the older session loses its pin
    assert pc.sessions == 1 and pc.bytes <= pc.capacity
    assert pc.match("ns", [13, 14, 15, 16]).length == 4


def test_session_moves_its_pin_to_the_new_path() -> None:
    pc = PrefixCache(1 << 30)
    pc.insert("ns", [1, 2, 3], _cache_with(3), session="s")
    pc.insert("ns", [1, 2, 3, 4, 5], _cache_with(5), session="s")
    leaves = pc._leaves()
    assert len(leaves) == 1 and leaves[0].pins == 1 and leaves[0].parent.pins == 1
    pc.unpin("s")
    assert all(n.pins == 0 for n in (leaves[0], leaves[0].parent))


def test_logits_are_kept_and_follow_a_split() -> None:
    pc = PrefixCache(1 << 30)
    lg = torch.randn(CFG.vocab_size)
    pc.insert("ns", [1, 2, 3, 4, 5, 6], _cache_with(6), logits={4: lg})
    pc.insert("ns", [1, 2, 3, 9], _cache_with(4))  # splits the edge after 3 tokens
    m = pc.match("ns", [1, 2, 3, 4])
    assert m.length == 4 and m.logits is not None and torch.equal(m.logits, lg)
    assert pc.match("ns", [1, 2, 3]).logits is None


def test_logits_are_not_kept_over_kv_they_did_not_come_from() -> None:
    pc = PrefixCache(1 << 30)
    pc.insert("ns", [1, 2, 3, 4, 5, 6], _cache_with(6))
    # a request that reused 3 tokens and recomputed the 4th: the tree holds another KV for it
    pc.insert("ns", [1, 2, 3, 4], _cache_with(4, seed=9), logits={4: torch.randn(CFG.vocab_size)}, fresh_from=3)
    assert pc.match("ns", [1, 2, 3, 4]).logits is None


def test_insert_refuses_a_cache_that_evicted() -> None:
    pc = PrefixCache(1 << 30)
    cache = _cache_with(8)
    for layer in cache.layers:
        layer.keep(torch.tensor([0, 1, 5, 6, 7]))
    assert pc.insert("ns", [1, 2, 3, 4, 5], cache) == 0 and pc.tokens == 0


def test_capacity_zero_disables() -> None:
    pc = PrefixCache(0)
    assert pc.insert("ns", [1, 2, 3], _cache_with(3)) == 0 and pc.match("ns", [1, 2, 3]).length == 0


# --------------------------------------------------------------------------- engine continuation


def _engine(llm: types.SimpleNamespace) -> Engine:
    return Engine(llm.model, llm.tokenizer, llm.eos_ids, ENGINE)


def _run(llm: types.SimpleNamespace, req: Request) -> tuple[RequestOutput, list[str], Sequence]:
    """Run one request on a fresh engine to the end: its output, text pieces and released sequence."""
    released: list[Sequence] = []
    req.on_release = lambda seq, out: released.append(_kept(seq))
    engine = _engine(llm)
    engine.add_request(req)
    pieces, out = [], None
    while engine.has_unfinished():
        for ev in engine.step():
            pieces.append(ev.text)
            out = ev.output
    assert out is not None and len(released) == 1
    return out, pieces, released[0]


def _cold(llm: types.SimpleNamespace, ids: list[int], params: SamplingParams, feed_last: bool = False) -> tuple[RequestOutput, list[str], Sequence]:
    return _run(llm, Request(ids, params, DensePolicy(), feed_last=feed_last))


def test_continuation_from_a_cached_prefix_matches_cold(llm: types.SimpleNamespace) -> None:
    ids = _ids(70)
    runner = Runner(llm.model, DensePolicy(), ENGINE)
    cold = runner.new_sequence()
    logits_cold = runner.prefill(cold, ids)
    pc = PrefixCache(1 << 30)
    pc.insert("ns", ids[:50], cold.cache)
    warm = runner.new_sequence()
    m = pc.match("ns", ids)
    assert m.length == 50
    pc.load(m, warm.cache, m.length)
    warm.tokens = ids[:50]
    logits_warm = runner.prefill(warm, ids[50:])
    torch.testing.assert_close(logits_warm, logits_cold, rtol=1e-5, atol=1e-5)
    for a, b in zip(warm.cache.layers, cold.cache.layers, strict=True):
        assert torch.equal(a.view()[0][:, :50], b.view()[0][:, :50])  # the reused prefix is a bit-exact copy
        torch.testing.assert_close(a.view()[0], b.view()[0], rtol=1e-5, atol=1e-5)


def test_warm_equals_cold_exactly_with_kept_logits(llm: types.SimpleNamespace) -> None:
    ids = _ids(40, seed=3)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=7)
    out1, pieces1, seq1 = _cold(llm, ids, params, feed_last=True)
    assert seq1.tokens == ids + out1.token_ids  # the last token was fed for the cache
    pc = PrefixCache(1 << 30)
    pc.insert("ns", seq1.tokens, seq1.cache, {len(ids): out1.prompt_logits})
    m = pc.match("ns", ids)
    assert m.length == len(ids) and m.logits is not None
    seq2 = Runner(llm.model, DensePolicy(), ENGINE).new_sequence()
    pc.load(m, seq2.cache, m.length)
    seq2.tokens = list(ids)
    out2, pieces2, _ = _run(llm, Request(ids, params, DensePolicy(), sequence=seq2, prompt_logits=m.logits))
    assert out2.token_ids == out1.token_ids and "".join(pieces2) == "".join(pieces1)
    assert out2.reused_tokens == len(ids) and out2.prefilled_tokens == 0


def test_stop_strings_and_the_last_token_fed(llm: types.SimpleNamespace) -> None:
    ids = _ids(20, seed=4)
    free, _, _ = _cold(llm, ids, SamplingParams(max_new_tokens=8, ignore_eos=True))
    text = "".join(llm.tokenizer.decode(free.token_ids))
    stop = text[3:5]
    out, pieces, seq = _cold(llm, ids, SamplingParams(max_new_tokens=8, stop=(stop,), ignore_eos=True))
    joined = "".join(pieces)
    assert out.finish_reason == "stop" and stop not in joined and text.startswith(joined)
    assert len(seq.tokens) == len(ids) + len(out.token_ids) - 1  # the token that completed the stop was not fed
    out, _, seq = _cold(llm, ids, SamplingParams(max_new_tokens=8, stop=(stop,), ignore_eos=True), feed_last=True)
    assert seq.tokens == ids + out.token_ids


def test_cancel_mid_prefill_leaves_a_consistent_reusable_prefix(llm: types.SimpleNamespace) -> None:
    ids = _ids(80, seed=5)
    calls = {"n": 0}

    def stop_after_some_layers() -> bool:
        calls["n"] += 1
        return calls["n"] > 2 * CFG.n_layers + 1  # two chunks and one layer of the third

    runner = Runner(llm.model, DensePolicy(), ENGINE)
    seq = runner.new_sequence()
    plan = runner.plan_prefill(seq, ids)
    with pytest.raises(Interrupted):
        while not plan.done:
            run_batch(llm.model, plan.next_works(), stop_after_some_layers)
    assert len(seq.tokens) == 2 * ENGINE.chunk_size
    assert seq.cache.tokens() == [len(seq.tokens)] * CFG.n_layers  # the cut forward's KV was rolled back
    pc = PrefixCache(1 << 30)
    assert pc.insert("ns", seq.tokens, seq.cache) == 32
    ref = Runner(llm.model, DensePolicy(), ENGINE)
    full = ref.new_sequence()
    logits_cold = ref.prefill(full, ids)
    resumed = ref.new_sequence()
    m = pc.match("ns", ids)
    pc.load(m, resumed.cache, m.length)
    resumed.tokens = ids[: m.length]
    torch.testing.assert_close(ref.prefill(resumed, ids[m.length :]), logits_cold, rtol=1e-5, atol=1e-5)


def test_abort_mid_decode_ends_the_request_and_keeps_its_tokens(llm: types.SimpleNamespace) -> None:
    engine = _engine(llm)
    released: list[Sequence] = []
    req = Request(_ids(10), SamplingParams(max_new_tokens=50, ignore_eos=True), DensePolicy(), on_release=lambda s, o: released.append(_kept(s)))
    engine.add_request(req)
    events = []
    while len([e for e in events if e.token_id is not None]) < 3:
        events += engine.step()
    engine.abort(req.request_id)
    last = engine.step()
    assert len(last) == 1 and last[0].finished and last[0].output.finish_reason == "cancelled"
    out = last[0].output
    assert 3 <= len(out.token_ids) < 50 and not engine.has_unfinished()
    assert released[0].tokens == req.prompt_ids + out.token_ids[:-1]  # the KV is that of the tokens fed


# --------------------------------------------------------------------------- fail closed


def test_only_provably_dense_kv_is_shared(llm: types.SimpleNamespace) -> None:
    assert shares_dense_kv(DensePolicy(), 10_000)
    assert not shares_dense_kv(DensePolicy(kv_quant="int4"), 10) and not shares_dense_kv(DensePolicy(kv_quant="int8"), 10)
    assert not shares_dense_kv(StreamingPolicy(budget=64, kv_quant="int8"), 10)
    assert shares_dense_kv(StreamingPolicy(budget=64), 64)
    assert not shares_dense_kv(StreamingPolicy(budget=64), 65)
    assert not shares_dense_kv(StreamingPolicy(budget=64, window=32), 64)  # evicts past sinks + window = 36
    # and the claim itself: streaming that never evicts computes the dense KV bit for bit
    ids = _ids(60, seed=6)
    dense, stream = Runner(llm.model, DensePolicy(), ENGINE), Runner(llm.model, StreamingPolicy(budget=64, sinks=4), ENGINE)
    sd, ss = dense.new_sequence(), stream.new_sequence()
    assert torch.equal(dense.prefill(sd, ids), stream.prefill(ss, ids))
    for a, b in zip(sd.cache.layers, ss.cache.layers, strict=True):
        assert torch.equal(a.view()[0], b.view()[0]) and torch.equal(a.view()[1], b.view()[1])
