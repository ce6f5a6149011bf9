"""Per-head KV stores: one layer whose KV heads keep different tokens (AdaKV, Feng et al. 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from longkv.kv.cache import LayerKV


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

    shareable = False

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

    @property
    def device(self) -> torch.device:
        return self.heads[0].device

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

    def kernel_reads(self, dtype: torch.dtype) -> bool:
        """False: every head keeps tokens of its own (see :meth:`LayerKV.kernel_reads`)."""
        return False

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
