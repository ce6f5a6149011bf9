"""KV memory (longkv.engine.memory): spans, edits without a prefill, compression, the memory manager, snapshots.

Tiny random Llamas in float32 (no model file). With one layer a token's KV depends
on the token and its position only, so a span cut out of the cache must leave
exactly the cache a cold prefill of the edited text computes: that is where the
re-rotation is checked to 1e-5. With more layers the later tokens' KV saw the
removed span; there the bookkeeping (tokens, positions, pages, bytes) is checked
exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import random_llama_weights

from longkv.config import EngineConfig, ModelConfig
from longkv.engine.memory import KVMemory
from longkv.engine.runner import Runner
from longkv.errors import LongKVError
from longkv.kv.pool import KVPools
from longkv.models import build
from longkv.policies import make_policy

CFG2 = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=4096, eos_token_ids=(0,),
)  # fmt: skip
CFG1 = dataclasses.replace(CFG2, n_layers=1, layers=())
ENGINE = EngineConfig(chunk_size=16, page_size=8, dtype="float32")
MODEL1 = build(CFG1, random_llama_weights(CFG1, 1, 0.3))
MODEL2 = build(CFG2, random_llama_weights(CFG2, 2, 0.3))


def _runner(model, policy: str = "dense", pools: KVPools | None = None) -> Runner:  # type: ignore[no-untyped-def]
    return Runner(model, make_policy(policy).resolve(model.config, ENGINE), ENGINE, pools)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (n,), generator=g).tolist()


def _session(model, sizes: list[int], pinned: int = 1, policy: str = "dense") -> KVMemory:  # type: ignore[no-untyped-def]
    mem = KVMemory(_runner(model, policy))
    for i, n in enumerate(sizes):
        mem.append("system" if i == 0 else ("tool" if i % 2 == 0 else "assistant"), _ids(n, 10 + i), pinned=i < pinned)
    return mem


def _cold(model, ids: list[int]) -> tuple[Runner, object, torch.Tensor]:  # type: ignore[no-untyped-def]
    r = _runner(model)
    seq = r.new_sequence()
    return r, seq, r.prefill(seq, ids)


def _assert_compact(mem: KVMemory) -> None:
    n = mem.tokens
    assert sum(s.kept for s in mem.spans) == n
    for lkv in mem.seq.cache.layers:
        assert lkv.n == n
        assert torch.equal(lkv.positions(), torch.arange(n))


def test_drop_equals_cold_prefill_of_the_edited_text_with_one_layer() -> None:
    mem = _session(MODEL1, [20, 37, 45, 30])
    spans = list(mem.spans)
    freed = mem.drop([spans[2].id, spans[2].id], forget=True)  # an id twice counts once
    assert freed == 45 and mem.tokens == 87 and [s.id for s in mem.spans] == [spans[0].id, spans[1].id, spans[3].id]
    _assert_compact(mem)
    edited = spans[0].ids + spans[1].ids + spans[3].ids
    assert mem.seq.tokens == edited and mem.logical_ids() == edited
    question = _ids(9, 99)
    warm = mem.runner.prefill(mem.seq, question)
    _, cold_seq, cold = _cold(MODEL1, edited + question)
    assert torch.allclose(warm, cold, atol=1e-5), (warm - cold).abs().max()
    k, v, _ = mem.seq.cache[0].view()
    ck, cv, _ = cold_seq.cache[0].view()
    assert torch.allclose(k, ck, atol=1e-5) and torch.allclose(v, cv, atol=1e-6)


def test_drop_of_the_last_spans_is_exact_with_any_depth_and_frees_pages() -> None:
    mem = _session(MODEL2, [24, 40, 40])
    pool = mem.seq.cache[0].pool
    used = pool.used_pages
    last = mem.spans[-1]
    mem.drop([last.id], forget=True)
    assert mem.tokens == 64 and pool.used_pages <= used - 40 // 8 + 1
    _assert_compact(mem)
    question = _ids(5, 7)
    warm = mem.runner.prefill(mem.seq, question)
    _, _, cold = _cold(MODEL2, mem.logical_ids()[: 64] + question)
    assert torch.allclose(warm, cold, atol=1e-5)


def test_a_middle_drop_with_more_layers_keeps_exact_bookkeeping() -> None:
    mem = _session(MODEL2, [16, 30, 50, 20, 11])
    before = mem.bytes()
    s = mem.spans
    mem.drop([s[1].id, s[3].id])  # their text stays in the session: a prompt repeating it reuses the rest
    assert [x.kept for x in mem.spans] == [16, 0, 50, 0, 11] and mem.logical_tokens == 127
    _assert_compact(mem)
    assert mem.tokens == 16 + 50 + 11 and mem.dropped_tokens == 50
    assert mem.seq.tokens == s[0].ids + s[2].ids + s[4].ids
    assert mem.bytes() < before
    assert mem.align([*mem.logical_ids(), 7]).matched == 127 and mem.tokens == 77  # nothing cut
    _, logits = mem.append("user", [7, 8])  # the edited cache still runs
    assert torch.isfinite(logits).all() and mem.tokens == 79


def test_edits_are_refused_on_pinned_and_unknown_spans() -> None:
    mem = _session(MODEL2, [16, 30], pinned=1)
    with pytest.raises(LongKVError, match="pinned"):
        mem.drop([mem.spans[0].id])
    with pytest.raises(LongKVError, match="pinned"):
        mem.compress(mem.spans[0].id, 0.5)
    with pytest.raises(LongKVError, match="no span 99 in this session"):
        mem.drop([99])
    with pytest.raises(LongKVError, match=r"keep must be a share in \(0, 1\)"):
        mem.compress(mem.spans[1].id, 1.5)
    with pytest.raises(LongKVError, match="unknown span kind"):
        mem.record("weird", [])
    assert mem.tokens == 46  # nothing changed


def test_compress_keeps_the_share_asked_for_and_the_span_edges() -> None:
    mem = _session(MODEL2, [16, 100, 12])
    tool = mem.spans[1]
    after = mem.spans[2].ids
    freed = mem.compress(tool.id, 0.3)
    assert tool.kept == math.ceil(0.3 * 100) == 30 and freed == 70 and tool.compressed and len(tool.ids) == 100
    _assert_compact(mem)
    kv = mem.seq.tokens
    assert kv[:16] == mem.spans[0].ids and kv[-12:] == after
    span_kv = kv[16:46]
    assert span_kv[:24] == tool.ids[:24] and span_kv[-4:] == tool.ids[-4:]  # head and tail kept
    it = iter(tool.ids)
    assert all(t in it for t in span_kv)  # a subsequence of the span, in order
    assert mem.logical_tokens == 128 and mem.compressed_tokens == 70
    assert mem.compress(tool.id, 0.5) == 2 and tool.kept == 28  # further, from what it keeps, never below head + tail
    big = _session(MODEL2, [16, 400])
    assert big.compress(big.spans[1].id, 0.5) == 200 and big.seq.tokens[16:40] == big.spans[1].ids[:24]


def test_compress_is_scored_by_the_probe() -> None:
    # Same span, two sessions: the kept set is a function of the KV (deterministic), not of luck.
    a, b = _session(MODEL2, [16, 80]), _session(MODEL2, [16, 80])
    a.compress(a.spans[1].id, 0.4)
    b.compress(b.spans[1].id, 0.4)
    assert a.seq.tokens == b.seq.tokens
    # another model may keep other tokens, never another count
    d = _session(MODEL1, [16, 80])
    d.compress(d.spans[1].id, 0.4)
    assert d.spans[1].kept == a.spans[1].kept == 32
    assert a.seq.tokens[16:48] != d.seq.tokens[16:48]  # 4 of the 32 are chosen by the scores


def test_align_keeps_repeated_spans_drops_left_out_ones_and_cuts_at_a_change() -> None:
    mem = _session(MODEL2, [16, 30, 40, 20])
    s = [list(x.ids) for x in mem.spans]
    ids = [x.id for x in mem.spans]
    new = _ids(6, 50)
    assert mem.align(s[0] + s[1] + s[2] + s[3] + new).matched == 106 and mem.tokens == 106
    # the client left span 2 out (a failed call): dropped, no prefill
    assert mem.align(s[0] + s[1] + s[3] + new).matched == 66
    assert [x.id for x in mem.spans] == [ids[0], ids[1], ids[3]]
    _assert_compact(mem)
    # a prompt that changes inside span 3: the part it repeats stays
    assert mem.align(s[0] + s[1] + s[3][:7] + new).matched == 53 and mem.tokens == 53
    # the prompt is the whole session: its last token is fed again for the logits
    assert mem.align(s[0] + s[1] + s[3][:7]).matched == 52
    # a pinned span the prompt changes: everything from it is cut
    assert mem.align(new + s[1]).matched == 0 and mem.tokens == 0 and mem.spans == []


def test_align_never_reuses_a_compressed_span_in_part() -> None:
    mem = _session(MODEL2, [16, 60, 20])
    s = [list(x.ids) for x in mem.spans]
    mem.compress(mem.spans[1].id, 0.5)
    assert mem.align(s[0] + s[1][:50] + _ids(3, 1)).matched == 16 and mem.tokens == 16
    mem2 = _session(MODEL2, [16, 60, 20])
    mem2.compress(mem2.spans[1].id, 0.5)
    assert mem2.align(s[0] + s[1] + s[2] + [5]).matched == 96 and mem2.tokens == 16 + 30 + 20


def test_fit_compresses_then_drops_the_oldest_unpinned_spans_only() -> None:
    mem = _session(MODEL2, [20, 60, 60, 60, 10], pinned=1)
    pinned_kv = list(mem.seq.tokens[:20])
    actions = mem.fit(120)
    assert mem.tokens <= 120
    ids = [s.id for s in mem.spans]
    assert actions[:2] == [{"compress": 2, "tokens": 32}, {"compress": 3, "tokens": 32}]  # to 28: head + tail
    assert mem.seq.tokens[:20] == pinned_kv and mem.spans[0].kept == 20
    assert ids[-1] == 5 and mem.spans[-1].kept == 10  # the newest untouched
    _assert_compact(mem)
    mem.fit(40)
    assert mem.tokens <= 40 and mem.spans[0].id == 1 and len(mem.spans) == 5 and mem.logical_tokens == 210
    with pytest.raises(LongKVError, match=r"cannot fit 10 tokens: its pinned spans \(system prompt, task\) hold 20"):
        mem.fit(10)
    mem.fit(21)  # every unpinned span can go, the newest last
    assert mem.tokens == 20 and [s.kept for s in mem.spans] == [20, 0, 0, 0, 0]


def test_fit_stubs_old_spans_to_their_head_before_dropping_any() -> None:
    mem = _session(MODEL2, [20, 200, 200, 10])
    s = [list(x.ids) for x in mem.spans]
    actions = mem.fit(100, recent=1)
    assert actions == [{"compress": 2, "tokens": 150}, {"compress": 3, "tokens": 150}, {"stub": 2, "tokens": 22}, {"stub": 3, "tokens": 22}]
    assert mem.tokens == 86 and [x.kept for x in mem.spans] == [20, 28, 28, 10]
    # a stub is the span's first 24 and last 4 tokens as sent (compression always kept that head)
    assert mem.seq.tokens[20:48] == s[1][:24] + s[1][-4:] and mem.seq.tokens[48:76] == s[2][:24] + s[2][-4:]
    _assert_compact(mem)
    mem.fit(60, recent=1)  # then the oldest go
    assert [x.kept for x in mem.spans] == [20, 0, 28, 10] and mem.logical_tokens == 430
    with pytest.raises(LongKVError, match="span 3 keeps 28 tokens: only spans of over 28 are stubbed"):
        mem.stub(3)
    with pytest.raises(LongKVError, match="pinned spans are never compressed"):
        mem.stub(1)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_snapshot_round_trip_is_bit_exact(tmp_path: Path, codec: str) -> None:
    policy = "dense" if codec == "none" else f"dense:kv_quant={codec}"
    mem = _session(MODEL2, [16, 50, 30], policy=policy)
    mem.compress(mem.spans[1].id, 0.5)
    path = tmp_path / "s" / "run.kv"
    size = mem.save(path, fingerprint="tiny")
    assert size == path.stat().st_size and not [p for p in path.parent.iterdir() if p != path]
    back = KVMemory.load(path, _runner(MODEL2, policy), fingerprint="tiny")
    assert back.seq.tokens == mem.seq.tokens and back.report() == mem.report()
    for a, b in zip(mem.seq.cache.layers, back.seq.cache.layers, strict=True):
        pa, qa = a.export()
        pb, qb = b.export()
        assert torch.equal(qa, qb) and all(torch.equal(pa[n], pb[n]) for n in pa)
    q = _ids(5, 4)
    assert torch.equal(mem.append("user", q)[1], back.append("user", q)[1])
    back.drop([back.spans[-1].id], forget=True)  # a loaded session edits like any other
    _assert_compact(back)


def test_snapshot_errors_and_a_failed_save_keep_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = _session(MODEL2, [16, 20])
    path = tmp_path / "a.kv"
    with pytest.raises(LongKVError, match="no session snapshot at"):
        KVMemory.load(path, _runner(MODEL2))
    mem.save(path, fingerprint="m1")
    with pytest.raises(LongKVError, match=r"was saved with another model file or settings \(m1\), not \(m2\)"):
        KVMemory.load(path, _runner(MODEL2), fingerprint="m2")
    with pytest.raises(LongKVError, match="fit this layer|saved from another model"):
        KVMemory.load(path, _runner(MODEL1), fingerprint="m1")
    bad = tmp_path / "bad.kv"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(LongKVError, match="is not a longkv session snapshot"):
        KVMemory.load(bad, _runner(MODEL2))
    good = path.read_bytes()
    mem.append("user", _ids(5, 5))

    def crash(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        mem.save(path, fingerprint="m1")
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["a.kv", "bad.kv"]


def test_memory_refuses_policies_that_change_the_kv() -> None:
    with pytest.raises(LongKVError, match="dense policy"):
        KVMemory(_runner(MODEL2, "snapkv:budget=64"))
