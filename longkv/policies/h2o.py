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

from longkv.errors import LongKVError
from longkv.policies.base import AccumulatedScorePolicy, Observation, needs_window, window_attention


@dataclass
class H2OPolicy(AccumulatedScorePolicy):
    """Keep the heavy hitters (accumulated attention) and a recent window.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept (default none: heavy hitters find them).
        recent_ratio: share of the budget given to the most recent tokens (the
            paper splits half and half).
        chunk: heavy hitters are kept in whole runs of this many tokens, ranked
            by their mean score (ChunkKV; 1: token by token). On the held needle
            split at 25 % kept (SmolLM2-135M, question-aware), 8 answered 8 of
            10 against 2 of 10 token by token.
    """

    name = "h2o"
    needs_queries: ClassVar[bool] = True
    budget: int = 4096
    sinks: int = 0
    recent_ratio: float = 0.5
    chunk: int = 8

    def protected(self, budget: int) -> tuple[int, int]:
        return self.sinks, int(budget * self.recent_ratio)

    def check_budget(self) -> None:
        """Also raises LongKVError for a ``recent_ratio`` outside [0, 1]."""
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise LongKVError(f"h2o recent_ratio must be within [0, 1], got {self.recent_ratio}: e.g. h2o:recent_ratio=0.5")
        super().check_budget()

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: attention mass the observation-window queries give each token (summed)."""
        return window_attention(keys, needs_window(self.name, queries), positions).sum(1)

    def describe(self) -> str:
        return f"h2o(budget={self.budget}, sinks={self.sinks}, recent_ratio={self.recent_ratio}{self.describe_storage()})"
