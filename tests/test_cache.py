"""Paged KV cache: append, view, gather, keep, drop, exact bytes."""

from __future__ import annotations

import torch

from longkv.kv.cache import KVCache, LayerKV


def _fill(layer: LayerKV, n: int, start: int = 0) -> None:
    pos = torch.arange(start, start + n)
    k = pos.float()[None, :, None].expand(2, n, 4).clone()
    layer.append(k, -k, pos)


def test_append_view_and_exact_bytes() -> None:
    layer = LayerKV(n_kv_heads=2, head_dim=4, page_size=8)
    _fill(layer, 10)
    k, v, pos = layer.view()
    assert k.shape == (2, 10, 4) and torch.equal(pos, torch.arange(10))
    assert torch.equal(v, -k)
    assert layer.n_pages == 2
    assert layer.capacity % 8 == 0 and layer.capacity >= 10
    # float32 K and V (2 heads x 4 dims x 4 bytes each) + int64 positions, per allocated slot
    assert layer.bytes() == layer.capacity * (2 * 2 * 4 * 4 + 8)
    assert layer.used_bytes() == 10 * (2 * 2 * 4 * 4 + 8)


def test_reserve_prevents_growth() -> None:
    layer = LayerKV(2, 4, page_size=8)
    layer.reserve(100)
    cap = layer.capacity
    assert cap == 104  # rounded up to whole pages
    _fill(layer, 100)
    assert layer.capacity == cap


def test_keep_packs_in_order_and_frees_memory() -> None:
    layer = LayerKV(2, 4, page_size=8)
    _fill(layer, 256)
    before = layer.bytes()
    keep = torch.tensor([0, 1, 2, 3, 250, 251, 252, 253, 254, 255])
    layer.keep(keep)
    k, _, pos = layer.view()
    assert torch.equal(pos, keep)
    assert torch.equal(k[0, :, 0], keep.float())
    assert layer.n == 10
    assert layer.bytes() < before / 8  # storage really shrank
    _fill(layer, 3, start=256)  # appends continue after the kept tokens
    assert layer.view()[2].tolist()[-4:] == [255, 256, 257, 258]


def test_gather_and_drop_pages() -> None:
    layer = LayerKV(2, 4, page_size=8)
    _fill(layer, 20)  # pages: [0..7], [8..15], [16..19]
    k, _, pos = layer.gather_pages(torch.tensor([2, 0]))
    assert pos.tolist() == [16, 17, 18, 19, *range(8)]
    assert torch.equal(k[1, :, 0], pos.float())
    layer.drop_pages(torch.tensor([1]))
    assert layer.view()[2].tolist() == [*range(8), 16, 17, 18, 19]


def test_cache_totals() -> None:
    cache = KVCache(n_layers=3, n_kv_heads=2, head_dim=4, page_size=8, dtype=torch.bfloat16)
    cache.reserve(16)
    for layer in cache.layers:
        _fill(layer, 16)
    assert cache.tokens() == [16, 16, 16]
    assert cache.bytes() == 3 * 16 * (2 * 2 * 4 * 2 + 8)
    cache.clear()
    assert cache.bytes() == 0 and cache.tokens() == [0, 0, 0]
