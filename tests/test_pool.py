"""The page pool: block manager accounting, copy-on-write forks, zero-copy prefix attach, pages back to zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import random_llama_weights

from longkv.attention.dense import attend, attend_segments
from longkv.config import EngineConfig, ModelConfig
from longkv.engine.engine import Engine, Request
from longkv.engine.runner import Runner
from longkv.engine.sampling import SamplingParams
from longkv.kv.cache import LayerKV
from longkv.kv.pool import KVPools, PageFormat, PagePool
from longkv.kv.radix import PrefixCache, reuse_length
from longkv.models import build
from longkv.policies import DensePolicy, make_policy

CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=1024, eos_token_ids=(0,),
)  # fmt: skip
ENGINE = EngineConfig(chunk_size=16, page_size=8, dtype="float32")
MODEL = build(CFG, random_llama_weights(CFG, 0, 0.2))


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_alloc_extend_release_and_free_runs() -> None:
    pool = PagePool(2, PageFormat(4), page_size=8)
    a = pool.alloc(3)
    b = pool.alloc(2)
    assert (a, b) == (0, 3) and pool.used_pages == 5 and pool.num_pages >= 5
    assert not pool.extend(a, 3, 1)  # b's first page is in the way
    assert pool.extend(b, 2, 4)  # past the end: the storage grows
    assert pool.used_pages == 9 and pool.num_pages >= 9
    pool.retain(a, 3)
    pool.release(a, 3)
    assert pool.used_pages == 9  # still referenced once
    pool.release(a, 3)
    assert pool.used_pages == 6 and pool._free[0] == [0, 3]
    assert pool.alloc(2) == 0  # first fit reuses the freed run
    pool.release(0, 2)
    pool.release(b, 6)
    assert pool.used_pages == 0 and pool.num_pages == 0  # an empty pool gives its storage back
    assert pool.page_bytes() == 8 * (2 * 2 * 4 * 4 + 8)


def test_fork_is_copy_on_write_and_pages_return() -> None:
    pool = PagePool(2, PageFormat(4), page_size=8)
    k, v = torch.randn(2, 40, 4), torch.randn(2, 40, 4)
    a = LayerKV(2, 4, 8, pool=pool)
    a.append(k[:, :20], v[:, :20], torch.arange(20))
    used = pool.used_pages
    b = a.fork()
    assert pool.used_pages == used  # a fork shares every page
    a.append(k[:, 20:30], v[:, 20:30], torch.arange(20, 30))
    b.append(-k[:, 20:25], -v[:, 20:25], torch.arange(20, 25))
    ka, va, pa = a.view()
    kb, vb, pb = b.view()
    assert torch.equal(vb, torch.cat((v[:, :20], -v[:, 20:25]), 1))
    assert torch.equal(ka, k[:, :30]) and torch.equal(va, v[:, :30]) and torch.equal(pa, torch.arange(30))
    assert torch.equal(kb, torch.cat((k[:, :20], -k[:, 20:25]), 1)) and torch.equal(pb, torch.arange(25))
    a.keep(torch.arange(0, 30, 3))  # an eviction in one never shows in the other
    assert torch.equal(a.view()[0], k[:, 0:30:3]) and torch.equal(b.view()[0], kb)
    a.clear()
    b.clear()
    assert pool.used_pages == 0


def test_decode_over_segments_equals_one_concatenated_cache() -> None:
    g = torch.Generator().manual_seed(0)
    segs = [(torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g), torch.arange(o, o + n)) for o, n in ((0, 13), (13, 7), (20, 5))]
    k, v, kpos = (torch.cat(x, dim=d) for x, d in zip(zip(*segs, strict=True), (1, 1, 0), strict=True))
    for t in (1, 3):
        q = torch.randn(4, t, 8, generator=g)
        qpos = torch.arange(25 - t, 25)
        torch.testing.assert_close(attend_segments(q, segs, qpos), attend(q, k, v, qpos, kpos), rtol=1e-5, atol=1e-6)


def test_prefix_hit_attaches_pages_without_copying_and_diverging_sessions_equal_cold() -> None:
    pools = KVPools(ENGINE.page_size)
    runner = Runner(MODEL, DensePolicy(), ENGINE, pools)
    shared, tail_a, tail_b = _ids(45, 1), _ids(9, 2), _ids(6, 3)
    first = runner.new_sequence()
    runner.prefill(first, shared + tail_a)
    pc = PrefixCache(1 << 30)
    assert pc.insert("ns", first.tokens, first.cache) == 54
    first.cache.clear()
    used = pools.used_pages()
    assert used == CFG.n_layers * 7  # the tree holds the pages of its 54 tokens now (the sequence's spare page went back)
    m = pc.match("ns", shared + tail_b)
    assert m.length == 45
    warm = runner.new_sequence()
    pc.load(m, warm.cache, m.length)
    assert pools.used_pages() == used  # attached, not copied
    src = pc.match("ns", shared).path[0]
    k0 = warm.cache[0].segments()[0][0]
    assert k0.data_ptr() == pools.get(0, CFG.n_kv_heads, PageFormat(CFG.head_dim)).planes["k"][:, src.slots[0]].data_ptr()
    warm.tokens = list(shared)
    logits_b = runner.prefill(warm, tail_b)
    cold = Runner(MODEL, DensePolicy(), ENGINE).new_sequence()
    torch.testing.assert_close(logits_b, Runner(MODEL, DensePolicy(), ENGINE).prefill(cold, shared + tail_b), rtol=1e-5, atol=1e-5)
    step = runner.decode(warm, 5)  # a decode step reads the shared pages and its own in place
    ref = Runner(MODEL, DensePolicy(), ENGINE).decode(cold, 5)
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)
    a_again = pc.match("ns", shared + tail_a)
    assert a_again.length == 54  # the other session's KV is untouched by this one's
    warm.cache.clear()
    pc.clear()
    assert pools.used_pages() == 0


@pytest.mark.parametrize("spec", ["dense", "snapkv", "streaming", "dense:kv_quant=int8"])
def test_engine_pages_back_to_zero_after_finish_cancel_and_error(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pol = make_policy(spec, budget=24) if spec in ("snapkv", "streaming") else make_policy(spec)
    engine = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, max_num_seqs=2)
    done = Request(_ids(40, 4), SamplingParams(max_new_tokens=5, ignore_eos=True), pol)
    cancelled = Request(_ids(70, 5), SamplingParams(max_new_tokens=50, ignore_eos=True), pol)
    engine.add_request(done)
    engine.add_request(cancelled)
    engine.step()
    assert engine.pools.used_pages() > 0
    engine.abort(cancelled.request_id)
    while engine.has_unfinished():
        engine.step()
    assert engine.pools.used_pages() == 0
    real = MODEL.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(MODEL, "forward", flaky)
    failing = Request(_ids(50, 6), SamplingParams(max_new_tokens=4, ignore_eos=True), pol)
    engine.add_request(failing)
    outs = []
    while engine.has_unfinished():
        outs += [e.output for e in engine.step() if e.finished]
    assert [o.finish_reason for o in outs] == ["error"] and engine.pools.used_pages() == 0


def test_compact_closes_the_holes_and_every_holder_follows_its_pages() -> None:
    pool = PagePool(2, PageFormat(4), page_size=8)
    kv = {name: (torch.randn(2, n, 4), torch.randn(2, n, 4), torch.arange(n) * 3) for name, n in (("a", 40), ("b", 24), ("c", 16))}
    layers = {}
    for name, (k, v, p) in kv.items():
        layers[name] = LayerKV(2, 4, 8, pool=pool)
        layers[name].append(k, v, p)
    fork = layers["b"].fork()
    assert [layers[x].run_start for x in "bc"] == [5, 8] and pool.num_pages == 12
    del layers["a"]  # its 5 pages free up in front of b's and c's: more free pages than used ones
    assert (pool.used_pages, pool.free_pages) == (5, 7)
    assert pool.compact()
    assert pool.compactions == 1 and pool.num_pages == 8 and pool.used_pages == 5 and pool._free == [[5, 3]]
    assert [layers[x].run_start for x in "bc"] == [0, 3] and fork.shared == [(0, 24)]
    for name, lkv in (("b", layers["b"]), ("c", layers["c"]), ("b", fork)):
        k, v, p = lkv.view()
        assert torch.equal(k, kv[name][0]) and torch.equal(v, kv[name][1]) and torch.equal(p, kv[name][2])
    assert not pool.compact()  # 3 free pages against 5 used: nothing to gain
    extra = torch.randn(2, 1, 4)
    fork.append(extra, extra, torch.tensor([99]))  # the fork writes next to b's pages: copy on write, b untouched
    assert torch.equal(layers["b"].view()[0], kv["b"][0]) and torch.equal(fork.view()[0][:, -1:], extra)
    for lkv in (layers["b"], layers["c"], fork):
        lkv.clear()
    assert pool.used_pages == 0


def _grow_and_cut(engine: Engine, pc: PrefixCache, rounds: int) -> list[list[int]]:
    """An agent's prompts through a prefix cache as a server runs them: a fixed head, turns that grow, every
    fourth turn the history cut to a new summary; each request reserves room for 128 new tokens (its
    ``max_tokens``) and stops after 12; the answers, greedy."""
    head, summary, turns, answers = _ids(40, 7), _ids(24, 8), [], []
    for r in range(rounds):
        if len(turns) == 4:
            summary, turns = _ids(30, 100 + r), turns[-1:]
        turns.append(_ids(20 + 9 * (r % 3), 200 + r))
        ids = head + summary + [t for turn in turns for t in turn]
        match = pc.match("ns", ids)
        reuse = reuse_length(match, len(ids), ENGINE.chunk_size)
        seq = None
        if reuse:
            seq = Runner(MODEL, DensePolicy(), ENGINE, engine.pools).new_sequence()
            pc.load(match, seq.cache, reuse)
            seq.cache.reserve(len(ids) + 128 + 1)
            seq.tokens = list(ids[:reuse])
        req = Request(ids, SamplingParams(max_new_tokens=12, ignore_eos=True), DensePolicy(), sequence=seq, feed_last=True,
                      on_release=lambda s, out: pc.insert("ns", s.tokens, s.cache))  # fmt: skip
        engine.add_request(req)
        outs = []
        while engine.has_unfinished():
            outs += [e.output for e in engine.step() if e.finished]
        answers.append(outs[0].token_ids)
        turns[-1] = turns[-1] + outs[0].token_ids
    return answers


def test_pools_stay_near_what_is_used_under_a_prefix_cache_with_prompts_that_grow_and_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache keeps a request's prompt pages and lets the ones reserved past them go: holes. Compacting
    between steps keeps the storage within 1.5x of the used pages (it grew past 3x without); the answers of
    requests whose cached pages moved equal a cold run's."""
    pc = PrefixCache(CFG.n_layers * 2 * CFG.n_kv_heads * CFG.head_dim * 4 * 400)  # about 400 tokens kept
    engine = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, max_num_seqs=1)
    answers = _grow_and_cut(engine, pc, 24)
    pool = engine.pools.get(0, CFG.n_kv_heads, PageFormat(CFG.head_dim))
    assert pool.compactions > 0
    assert pool.num_pages <= pool.used_pages + -(-pool.used_pages // 2)
    cold = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, max_num_seqs=1)
    assert answers == _grow_and_cut(cold, PrefixCache(0), 24)

    monkeypatch.setattr(KVPools, "compact", lambda self: 0)  # what the pools did without it
    loose = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, max_num_seqs=1)
    _grow_and_cut(loose, PrefixCache(pc.capacity), 24)
    grown = loose.pools.get(0, CFG.n_kv_heads, PageFormat(CFG.head_dim))
    assert grown.used_pages == pool.used_pages and grown.num_pages > 3 * grown.used_pages


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's resident memory from /proc")
def test_freed_storage_goes_back_to_the_system() -> None:
    """A pool's planes past 1 MiB are memory maps of their own: when the pool shrinks (or compacts), the pages
    leave the process, where a freed heap block of a few MiB would stay with it."""

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    pool = PagePool(3, PageFormat(64, torch.bfloat16), page_size=64)
    before = rss_mib()
    first = pool.alloc(3000)  # 3000 pages x 64 slots x 3 heads x 64 x 2 planes x 2 bytes: 141 MiB
    for name in pool.planes:
        pool.planes[name].fill_(1)  # (no name bound to a plane here: it would keep it alive)
    assert rss_mib() - before > 120
    assert all(t.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0 for t in pool.planes.values())  # maps start on a page
    pool.release(first, 3000)
    assert pool.num_pages == 0 and rss_mib() - before < 20
