"""Random eviction: the baseline every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkv.policies.base import EvictionPolicy, Observation


@dataclass
class RandomPolicy(EvictionPolicy):
    """Keep ``budget`` tokens drawn uniformly at random (deterministic for a given seed).

    The draw depends on ``seed``, the layer and the number of cached tokens only,
    so the same input always keeps the same tokens.

    Attributes:
        budget: tokens kept per layer.
        sinks, window: tokens always kept at the start / end (default none).
        seed: random seed.
    """

    name = "random"
    budget: int = 4096
    sinks: int = 0
    window: int = 0
    seed: int = 0

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(N,) float32 uniform in [0, 1)."""
        n = keys.shape[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 7_919 + n)
        return torch.rand(n, generator=gen, device="cpu").to(keys.device)  # the same draws on every device
