"""AdaKV: one layer budget shared unevenly by the heads (Feng et al. 2024, arXiv:2407.11550).

Heads differ: some concentrate their attention on a few tokens, others spread
it. Ranking every (head, token) pair of a layer together, by attention-based
scores that are comparable across heads, and keeping the best
``budget * n_kv_heads`` pairs gives focused heads few tokens and diffuse heads
many. A safeguard keeps at least ``floor * budget`` tokens in every head.

Heads really hold different numbers of tokens: the layer is stored as one
single-head store per KV head (:class:`~longkv.kv.headwise.HeadwiseLayerKV`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.kv.headwise import HeadwiseLayerKV
from longkv.policies.base import Observation, chunk_rank, protect, ranked
from longkv.policies.wrapper import ScorerWrapper


@dataclass
class AdaKVPolicy(ScorerWrapper):
    """Per-head budgets under one layer budget of ``budget * n_kv_heads`` (head, token) pairs.

    Attributes:
        budget: mean tokens kept per KV head (so per layer, as for other methods).
        scorer: spec of the attention-based scorer (``snapkv``, ``tova``, ``expected_attention``).
        floor: share of ``budget`` every head keeps at least (the paper's safeguard).

    Raises:
        LongKVError: unknown scorer, or floor outside [0, 1].
    """

    name = "adakv"
    per_head: ClassVar[bool] = True
    budget: int = 4096
    floor: float = 0.2

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise LongKVError(f"adakv floor must be within [0, 1] (got {self.floor}): it is a share of the budget")
        super().validate(model, engine)

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """The scorer's scores for the given heads: (Hkv, N)."""
        s = self.inner.score(layer, keys, values, positions, queries).float()
        return s if s.dim() == 2 else s.expand(keys.shape[0], -1)

    def compress(self, layer: int, cache: LayerKV, queries: Observation | None = None) -> None:
        assert isinstance(cache, HeadwiseLayerKV), "adakv needs a per-head store (Runner builds one)"
        heads = cache.heads
        total = self.budget * len(heads)
        if sum(h.n for h in heads) <= total:
            return
        sinks, window = self.protected(self.budget)
        forced = max(int(self.floor * self.budget), sinks + window)
        g = queries.q.shape[0] // len(heads) if queries is not None else 0
        scores = []
        for i, h in enumerate(heads):
            k, v, pos = h.view()
            q = queries.heads(i * g, (i + 1) * g) if queries is not None else None
            s = protect(self.score(layer, k, v, pos, q)[0], sinks, window)
            top = torch.topk(s, min(forced, h.n)).indices
            s[top] = torch.inf  # safeguard: every head keeps its best `forced` tokens
            scores.append(s)
        flat = torch.cat(scores)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if self.chunk > 1:  # whole runs of each head, ranked by their mean score across heads
            rank = torch.cat([chunk_rank(s, self.chunk) for s in scores])
            chosen[ranked(flat, rank)[:total]] = True
        else:
            chosen[torch.topk(flat, total, sorted=False).indices] = True
        counts = [h.n for h in heads]  # offsets into `flat`, taken before any head shrinks
        for h, part in zip(heads, chosen.split(counts), strict=True):
            h.keep(part.nonzero().squeeze(1))

    def describe(self) -> str:
        return f"adakv(budget={self.budget}, scorer={self.scorer}, floor={self.floor}{self.describe_storage()})"
