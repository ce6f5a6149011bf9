"""H2O: heavy hitters plus recent tokens (Zhang et al. 2023, arXiv:2306.14048).

A few tokens collect most of the attention mass over the whole generation
("heavy hitters"). H2O keeps the tokens with the largest attention accumulated
over every query so far, beside a window of the most recent tokens.

Here the accumulation runs over the observation-window queries the runner
hands over at each compression (every query during decode, the last 32 of each
chunk during prefill), stored per token in ``LayerKV.acc`` so it survives
evictions and is freed with the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from longkv.kv.cache import LayerKV
from longkv.policies.base import EvictionPolicy, needs_window, protect, window_attention


@dataclass
class H2OPolicy(EvictionPolicy):
    """Keep the heavy hitters (accumulated attention) and a recent window.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept (default none: heavy hitters find them).
        recent_ratio: share of the budget given to the most recent tokens (the
            paper splits half and half).
    """

    name = "h2o"
    needs_queries: ClassVar[bool] = True
    budget: int = 4096
    sinks: int = 0
    recent_ratio: float = 0.5

    def protected(self, budget: int) -> tuple[int, int]:
        return self.sinks, int(budget * self.recent_ratio)

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: torch.Tensor | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: attention mass the observation-window queries give each token (summed)."""
        return window_attention(keys, needs_window(self.name, queries), positions).sum(1)

    def compress(self, layer: int, cache: LayerKV, queries: torch.Tensor | None = None) -> None:
        # Accumulate at every call (not only when something must go), then rank by the total.
        if queries is not None and cache.n:
            k, v, pos = cache.view()
            acc = cache.acc if cache.acc is not None else torch.zeros(k.shape[0], 0)
            cache.acc = F.pad(acc, (0, cache.n - acc.shape[1])) + self.score(layer, k, v, pos, queries)
        super().compress(layer, cache, queries)

    def select(self, layer: int, cache: LayerKV, queries: torch.Tensor | None, budget: int) -> torch.Tensor | None:
        if cache.n <= budget:
            return None
        acc = cache.acc if cache.acc is not None else torch.zeros(1, 0)
        scores = protect(F.pad(acc, (0, cache.n - acc.shape[1])).sum(0), *self.protected(budget))
        return torch.topk(scores, budget, sorted=False).indices.sort().values

    def describe(self) -> str:
        return f"h2o(budget={self.budget}, sinks={self.sinks}, recent_ratio={self.recent_ratio})"
