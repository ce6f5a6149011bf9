"""Tiered KV (longkv.kv.tiers): lossless and bounded round trips, RAM bounds, block_topk on tiers."""

from __future__ import annotations

import os

import pytest
import torch

from longkv.config import EngineConfig
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.kv.quant import quantize
from longkv.kv.tiers import DiskStore, TieredLayerKV, parse_bytes
from longkv.policies import BlockTopKPolicy, DensePolicy, make_policy
from tests.test_block_topk import PS, _run, tiny_model

H, D = 2, 16


def _data(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, n, D, generator=g) * 3).to(dtype), torch.randn(H, n, D, generator=g).to(dtype), torch.arange(n) + 7


def _fill(store: LayerKV, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, chunks: tuple[int, ...]) -> None:
    at = 0
    for c in chunks:
        store.append(k[:, at : at + c], v[:, at : at + c], pos[at : at + c])
        at += c


@pytest.mark.parametrize("cold", ["ram", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncoded_tiers_round_trip_exactly(cold: str, dtype: torch.dtype, tmp_path) -> None:
    k, v, pos = _data(203, dtype=dtype)
    tiered = TieredLayerKV(H, D, PS, dtype, pinned_tokens=2 * PS, hot_tokens=3 * PS, cold=cold, codec="none", directory=tmp_path)
    plain = LayerKV(H, D, PS, dtype)
    for store in (tiered, plain):
        _fill(store, k, v, pos, (5, 11, 40, 1, 1, 64, 81))
    assert tiered.n == plain.n == 203
    assert tiered.head.n == 2 * PS and tiered.spill_to <= tiered.tail.n < tiered.spill_to + PS  # sinks pinned, newest hot
    assert tiered.cold.n_pages == (203 - 2 * PS - tiered.tail.n) // PS > 0
    for lo, hi in ((0, 203), (3, 17), (16, 16), (20, 150), (150, 203), (0, 5)):
        got, want = tiered.read(lo, hi), plain.read(lo, hi)
        for a, b in zip(got, want, strict=True):
            assert a is not None and b is not None and torch.equal(a, b)
    pages = torch.tensor([0, 3, 4, 5, 9, 20, 25])
    for a, b in zip(tiered.gather_pages(pages), plain.gather_pages(pages), strict=True):
        assert torch.equal(a, b)
    # keys only: no values loaded
    assert tiered.read(20, 90, values=False)[1] is None
    # cut back into the cold pages, then grow again: same as the plain store
    for cut in (150, 61, 20, 9):
        tiered.truncate(cut)
        plain.truncate(cut)
        assert tiered.n == cut
        _fill(tiered, k[:, cut:], v[:, cut:], pos[cut:], (203 - cut,))
        _fill(plain, k[:, cut:], v[:, cut:], pos[cut:], (203 - cut,))
        for a, b in zip(tiered.view(), plain.view(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("codec,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("cold", ["ram", "disk"])
def test_coded_tiers_stay_within_the_codec_bound(codec: str, bits: int, cold: str, tmp_path) -> None:
    k, v, pos = _data(160, seed=1)
    tiered = TieredLayerKV(H, D, PS, torch.float32, pinned_tokens=PS, hot_tokens=2 * PS, cold=cold, codec=codec, directory=tmp_path)
    _fill(tiered, k, v, pos, (30, 70, 60))
    lo, hi = PS, tiered.cold_end
    assert hi - lo >= 10 * PS
    gk, gv, gpos = tiered.read(lo, hi)
    assert gv is not None and torch.equal(gpos, pos[lo:hi])
    for got, x in ((gk, k[:, lo:hi]), (gv, v[:, lo:hi])):
        _, step, _ = quantize(x, bits, 16)
        bound = step.float().repeat_interleave(16, dim=-1) * 0.5 + 1e-3 * x.abs() + 1e-3  # half a step (+ fp16 rounding)
        err = (got - x).abs()
        assert bool((err <= bound).all()), float((err - bound).max())
        assert err.max() > 0  # really coded
    # the pinned and hot parts are exact
    for a, b in zip(tiered.read(0, PS), (k[:, :PS], v[:, :PS], pos[:PS]), strict=True):
        assert a is not None and torch.equal(a, b)
    assert torch.equal(tiered.read(hi, 160)[0], k[:, hi:])


def test_disk_tier_keeps_ram_bounded_and_leaves_no_file(tmp_path) -> None:
    hot = 4 * PS
    tiered = TieredLayerKV(H, D, PS, torch.bfloat16, pinned_tokens=PS, hot_tokens=hot, cold="disk", codec="int8", directory=tmp_path)
    assert os.listdir(tmp_path) == []  # the page file is unlinked at once
    per_token = 2 * H * D * 2 + 8
    k, v, pos = _data(2000, dtype=torch.bfloat16)
    peak = 0
    for at in range(0, 2000, 50):
        tiered.append(k[:, at : at + 50], v[:, at : at + 50], pos[at : at + 50])
        peak = max(peak, tiered.bytes())
    # RAM: pinned page + hot tail + one chunk (before the spill) + page rounding, whatever the length
    assert peak <= (PS + hot + 50 + 2 * PS) * per_token
    assert tiered.disk_bytes() == tiered.cold.n_pages * tiered.cold.record > 0
    assert tiered.cold.n_pages * PS == 2000 - PS - tiered.tail.n
    tiered.close()
    assert tiered.n == 0


def test_tier_errors_are_clear(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(LongKVError, match="is not a folder: create it first"):
        DiskStore(H, D, PS, torch.float32, "int8", directory=tmp_path / "missing" / "sub")
    assert not (tmp_path / "missing").exists()  # a user's tier_dir is never created behind their back
    with pytest.raises(LongKVError, match="is not a folder"):
        DiskStore(H, D, PS, torch.float32, "int8", directory=blocked)
    with pytest.raises(LongKVError, match="cannot create a KV page file in /proc"):
        DiskStore(H, D, PS, torch.float32, "int8", directory="/proc")  # a folder no file can be made in
    with pytest.raises(LongKVError, match="unknown KV tier 'tape'"):
        TieredLayerKV(H, D, PS, cold="tape")
    with pytest.raises(LongKVError, match="unknown KV tier codec 'fp8'"):
        TieredLayerKV(H, D, PS, cold="ram", codec="fp8")
    with pytest.raises(LongKVError, match="keeps every token"):
        TieredLayerKV(H, D, PS, cold="ram").keep(torch.arange(0))
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5k") == 1536
    assert parse_bytes("2000") == 2000 and parse_bytes("1GB") == 10**9
    with pytest.raises(LongKVError, match="as a size in bytes"):
        parse_bytes("12 parsecs")


# ---------------------------------------------------------------- block_topk over tiers (tiny model, float32)
def _resident(hot_tokens: int, sinks: int = PS, chunk: int = 16) -> str:
    per_token = 2 * 2 * 16 * 4 + 8  # tiny model: 2 KV heads x 16 dims, float32, + position
    return str((hot_tokens + sinks + chunk) * per_token * 2)  # 2 layers


def test_block_topk_on_an_uncoded_disk_tier_equals_it_in_ram(tmp_path) -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    base = BlockTopKPolicy(topk=3, sinks=PS, window=2 * PS, query_tokens=12, reencode=False)
    ram, _ = _run(model, base, ids, [5, 6, 7])
    tier = make_policy(base, resident=_resident(64), cold="disk", cold_codec="none", tier_dir=str(tmp_path))
    assert isinstance(tier, BlockTopKPolicy)
    tier = tier.resolve(model.config, EngineConfig(chunk_size=16, page_size=PS))
    disk, seq = _run(model, tier, ids, [5, 6, 7])
    lkv = seq.cache[0]
    assert isinstance(lkv, TieredLayerKV) and lkv.hot_tokens == 64 and lkv.cold.n_pages > 30
    assert torch.equal(disk, ram)
    assert 0 < seq.peak_kv_bytes <= int(tier.resident)  # the resident budget holds, exactly accounted
    # selecting every page from a disk tier is still dense attention
    dense, _ = _run(model, DensePolicy(), ids, [5, 6, 7])
    every = BlockTopKPolicy(topk=1000, prefill_topk=1000, sinks=PS, window=2 * PS, query_tokens=12,
                            resident=_resident(64), cold_codec="none", tier_dir=str(tmp_path))
    got, _ = _run(model, every, ids, [5, 6, 7])
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-4)


def test_block_topk_on_an_int8_tier_stays_close(tmp_path) -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    # reencode off: the answer reads the selected pages' cached (coded) keys and values
    base = BlockTopKPolicy(topk=3, sinks=PS, window=2 * PS, query_tokens=12, reencode=False)
    ram, _ = _run(model, base, ids, [5])
    tier = make_policy(base, resident=_resident(64), cold="ram")
    got, seq = _run(model, tier, ids, [5])
    assert seq.cache[0].cold.n_pages > 30
    assert 0 < (got - ram).abs().max().item() < 0.02 * (ram.max() - ram.min()).item()  # int8 noise, same pages
