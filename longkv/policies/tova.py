"""TOVA: token omission via attention of the current query (Oren et al. 2024, arXiv:2401.06104).

A multi-state RNN view of a decoder: at each step keep the tokens the newest
query attends to most (averaged over heads), drop the rest. No sinks or window
are promised; the attention itself decides (it usually keeps the first token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkv.policies.base import EvictionPolicy, Observation, needs_window, window_attention


@dataclass
class TOVAPolicy(EvictionPolicy):
    """Keep the tokens the last query attends to most.

    Attributes:
        budget: tokens kept per layer.
        sinks, window: tokens always kept at the start / end (default none).
        chunk: keep tokens in whole runs of this many, ranked by their mean
            score (ChunkKV, Liu et al. 2025); 1 (default, not measured above 1
            for this method) ranks token by token.
    """

    name = "tova"
    needs_queries: ClassVar[bool] = True
    budget: int = 4096
    sinks: int = 0
    window: int = 0
    chunk: int = 1

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: attention of the newest query, mean over its group's heads."""
        q = needs_window(self.name, queries).last(1)
        return window_attention(keys, q, positions)[:, 0]
