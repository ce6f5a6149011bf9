"""KNorm: keep the keys with the lowest L2 norm (Devoto et al. 2024, arXiv:2406.11430).

Keys with a low norm tend to receive high attention, so the key norm alone is
a cheap, query-free proxy for importance: question-agnostic by construction,
and it needs no attention scores at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkv.policies.base import EvictionPolicy, Observation


@dataclass
class KNormPolicy(EvictionPolicy):
    """Keep the ``budget`` tokens whose keys have the lowest L2 norm (summed over KV heads).

    Attributes:
        budget: tokens kept per layer.
        sinks, window: tokens always kept at the start / end (default none).
        chunk: keep tokens in whole runs of this many, ranked by their mean
            score (ChunkKV, Liu et al. 2025); 1 (default, not measured above 1
            for this method) ranks token by token.
    """

    name = "knorm"
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
        """(Hkv, N) float32: minus the key norm (RoPE rotations keep norms, so rotated keys do)."""
        return -keys.float().norm(dim=-1)
