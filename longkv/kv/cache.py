"""Paged KV cache: where keys and values live, per layer.

Each layer stores its cached tokens in logical order (increasing original
position) in one buffer per K and V, cut into fixed-size pages of
``page_size`` tokens: page ``i`` holds tokens ``[i * page_size, (i + 1) * page_size)``
of the cache (not of the input: after an eviction the kept tokens are packed
together again). Keys are stored already rotated by RoPE at their **original**
position, and that position is kept for every token, so attention can move
any key to another position by rotating it by the difference (see
``longkv.models.layers.Rotary``).

Freeing is real: :meth:`LayerKV.keep` and :meth:`LayerKV.drop_pages` pack the
survivors and give the buffer back when it is far larger than what is left,
and :meth:`bytes` counts the storage that is actually allocated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class LayerKV:
    """Keys, values and original positions of one layer's cached tokens.

    Storage: ``k``, ``v``: (Hkv, capacity, D) of the cache dtype; ``pos``: (capacity,) int64.
    Only the first ``n`` tokens are valid. ``capacity`` is a multiple of ``page_size``.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, page_size: int = 64, dtype: torch.dtype = torch.float32) -> None:
        self.page_size = page_size
        self.k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype)
        self.v = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype)
        self.pos = torch.empty(0, dtype=torch.int64)
        self.n = 0
        # Per-token scores a policy accumulates over time (H2O): (Hkv, <= n) float32 or None.
        # keep() reindexes them with the tokens; the policy pads them for new tokens.
        self.acc: torch.Tensor | None = None

    # ---------------------------------------------------------------- sizes
    @property
    def capacity(self) -> int:
        """Allocated slots, in tokens."""
        return self.k.shape[1]

    @property
    def n_pages(self) -> int:
        """Pages holding at least one cached token."""
        return -(-self.n // self.page_size)

    def bytes(self) -> int:
        """Bytes allocated for this layer (K + V + positions + accumulated scores), used or not."""
        acc = 0 if self.acc is None else self.acc.nbytes
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes + acc

    def used_bytes(self) -> int:
        """Bytes of the ``n`` valid tokens (K + V + positions)."""
        per_token = (self.k.nbytes + self.v.nbytes + self.pos.nbytes) // max(self.capacity, 1)
        return self.n * per_token if self.capacity else 0

    # ---------------------------------------------------------------- storage
    def _resize(self, capacity: int) -> None:
        capacity = _round_up(max(capacity, self.n), self.page_size)
        if capacity == self.capacity:
            return
        h, _, d = self.k.shape
        k = torch.empty(h, capacity, d, dtype=self.k.dtype)
        v = torch.empty(h, capacity, d, dtype=self.v.dtype)
        pos = torch.full((capacity,), -1, dtype=torch.int64)
        k[:, : self.n] = self.k[:, : self.n]
        v[:, : self.n] = self.v[:, : self.n]
        pos[: self.n] = self.pos[: self.n]
        self.k, self.v, self.pos = k, v, pos

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` in total without a later reallocation."""
        if n_tokens > self.capacity:
            self._resize(n_tokens)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Add T tokens at the end.

        k, v: (Hkv, T, D); positions: (T,) int64, each larger than every cached position.
        Grows the buffers geometrically when full (call :meth:`reserve` to avoid that).
        """
        t = k.shape[1]
        need = self.n + t
        if need > self.capacity:
            self._resize(max(need, 2 * self.capacity))
        self.k[:, self.n : need] = k
        self.v[:, self.n : need] = v
        self.pos[self.n : need] = positions
        self.n = need

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All cached tokens, zero-copy: k, v: (Hkv, n, D); positions: (n,)."""
        return self.k[:, : self.n], self.v[:, : self.n], self.pos[: self.n]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[0]

    def read(self, lo: int, hi: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Tokens [lo, hi) of the cache: k, v (Hkv, hi - lo, D) and positions (zero-copy here).

        ``values=False`` returns None for v (scoring reads keys only; a tiered
        store then skips loading them). ``0 <= lo <= hi <= n``.
        """
        return self.k[:, lo:hi], (self.v[:, lo:hi] if values else None), self.pos[lo:hi]

    def gather_pages(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy out the tokens of the given pages, in the order given.

        page_ids: (P,) int64 in ``[0, n_pages)``. Returns k, v: (Hkv, <= P * page_size, D)
        and positions (the last page may be partly filled).
        """
        idx = (page_ids[:, None] * self.page_size + torch.arange(self.page_size)[None, :]).reshape(-1)
        idx = idx[idx < self.n]
        return self.k[:, idx], self.v[:, idx], self.pos[idx]

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at ``indices`` (sorted, unique, int64 in ``[0, n)``); free the rest.

        Survivors are packed to the front in the same order. The buffers shrink
        when they would be over twice the size needed, so evicted tokens really
        give their memory back.
        """
        m = indices.numel()
        assert m <= self.n
        if m == self.n:
            return
        self.k[:, :m] = self.k[:, indices]
        self.v[:, :m] = self.v[:, indices]
        self.pos[:m] = self.pos[indices]
        if self.acc is not None:
            self.acc = self.acc[:, indices[indices < self.acc.shape[1]]].contiguous()
        self.n = m
        if self.capacity > 2 * _round_up(max(m, 1), self.page_size):
            self._resize(m)

    def drop_pages(self, page_ids: torch.Tensor) -> None:
        """Free whole pages (page_ids: (P,) int64); the remaining tokens are repacked."""
        mask = torch.ones(self.n, dtype=torch.bool)
        for p in page_ids.tolist():
            mask[p * self.page_size : (p + 1) * self.page_size] = False
        self.keep(mask.nonzero().squeeze(1))

    def truncate(self, n: int) -> None:
        """Forget every token from index ``n`` on (storage is kept for reuse). ``0 <= n <= self.n``."""
        assert 0 <= n <= self.n
        self.n = n

    def clear(self) -> None:
        """Drop every token and free the storage."""
        self.n = 0
        self.acc = None
        self._resize(0)

    def mark(self) -> object:
        """A point to :meth:`rollback` to: tokens appended after it can be forgotten."""
        return self.n

    def rollback(self, mark: object) -> None:
        """Forget every token appended since :meth:`mark` (nothing may have been evicted since)."""
        assert isinstance(mark, int)
        self.truncate(mark)


class HeadwiseLayerKV(LayerKV):
    """One layer whose KV heads keep different tokens (AdaKV): one single-head store per KV head.

    ``heads[h]`` is a :class:`LayerKV` with one KV head; each holds its own
    tokens and original positions, so head ``h`` really frees what it evicts.
    ``n`` is the mean number of tokens per head (rounded up), which is what a
    per-layer budget bounds; :meth:`tokens_per_head` gives the exact counts.

    Args:
        make_head: builds one single-head store (plain or quantized).
        n_kv_heads: number of KV heads.
    """

    def __init__(self, make_head: Callable[[], LayerKV], n_kv_heads: int) -> None:
        self.heads = [make_head() for _ in range(n_kv_heads)]
        self.page_size = self.heads[0].page_size
        self.acc = None

    @property
    def n(self) -> int:  # type: ignore[override]
        return -(-sum(h.n for h in self.heads) // len(self.heads))

    @property
    def capacity(self) -> int:
        return max(h.capacity for h in self.heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.heads)

    def tokens_per_head(self) -> list[int]:
        """Exact cached tokens of every KV head."""
        return [h.n for h in self.heads]

    def bytes(self) -> int:
        return sum(h.bytes() for h in self.heads)

    def used_bytes(self) -> int:
        return sum(h.used_bytes() for h in self.heads)

    def reserve(self, n_tokens: int) -> None:
        for h in self.heads:
            h.reserve(n_tokens)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: (Hkv, T, D); the same T tokens go to every head.

        A head grows to exactly what it needs (no doubling): heads hold uneven
        numbers of tokens, and doubling the fullest one would overshoot the bound.
        """
        for i, h in enumerate(self.heads):
            h.reserve(h.n + k.shape[1])
            h.append(k[i : i + 1], v[i : i + 1], positions)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise AssertionError("heads hold different tokens: read heads[h].view()")

    def gather_pages(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise AssertionError("heads hold different tokens: read heads[h].gather_pages()")

    def keep(self, indices: torch.Tensor) -> None:
        """Keep the same ``indices`` in every head (use ``heads[h].keep`` for per-head sets)."""
        for h in self.heads:
            h.keep(indices)

    def clear(self) -> None:
        for h in self.heads:
            h.clear()

    def mark(self) -> object:
        return tuple(h.n for h in self.heads)

    def rollback(self, mark: object) -> None:
        assert isinstance(mark, tuple)
        for h, n in zip(self.heads, mark, strict=True):
            h.truncate(n)


class KVCache:
    """One :class:`LayerKV` per decoder layer.

    Args:
        n_layers, n_kv_heads, head_dim: model shape.
        page_size: tokens per page.
        dtype: storage dtype of K and V.
        make_layer: builds each layer's store instead of a plain :class:`LayerKV`
            (quantized, per-head); see ``KVPolicy.new_layer_kv``.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        page_size: int = 64,
        dtype: torch.dtype = torch.float32,
        make_layer: Callable[[], LayerKV] | None = None,
    ) -> None:
        if make_layer is None:
            self.layers = [LayerKV(n_kv_heads, head_dim, page_size, dtype) for _ in range(n_layers)]
        else:
            self.layers = [make_layer() for _ in range(n_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def bytes(self) -> int:
        """Bytes allocated over all layers."""
        return sum(layer.bytes() for layer in self.layers)

    def used_bytes(self) -> int:
        """Bytes of the valid tokens over all layers."""
        return sum(layer.used_bytes() for layer in self.layers)

    def tokens(self) -> list[int]:
        """Cached tokens per layer."""
        return [layer.n for layer in self.layers]

    def reserve(self, n_tokens: int) -> None:
        """Reserve ``n_tokens`` in every layer."""
        for layer in self.layers:
            layer.reserve(n_tokens)

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` of every layer (see :meth:`LayerKV.truncate`)."""
        for layer in self.layers:
            layer.truncate(min(n_tokens, layer.n))

    def marks(self) -> list[object]:
        """Every layer's :meth:`LayerKV.mark` (to undo a forward cut short)."""
        return [layer.mark() for layer in self.layers]

    def rollback(self, marks: list[object]) -> None:
        """Forget what every layer appended since :meth:`marks`."""
        for layer, m in zip(self.layers, marks, strict=True):
            layer.rollback(m)

    def clear(self) -> None:
        """Free every layer."""
        for layer in self.layers:
            layer.clear()
