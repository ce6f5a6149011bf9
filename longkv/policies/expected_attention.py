"""Expected attention: score tokens by the attention that future queries are expected to pay.

As in NVIDIA kvpress ("expected attention"): model the queries still to come as
a Gaussian fitted to recent queries (mean ``mu``, diagonal variance ``s2`` per
head). For ``q ~ N(mu, diag(s2))`` the expected unnormalised attention of a key
``k`` is ``E[exp(q.k / sqrt(D))] = exp(mu.k / sqrt(D) + sum(s2 * k**2) / (2 D))``;
normalised over the cached tokens that is an attention distribution that no
particular question produced, so it serves question-agnostic compression (a
context compressed once, asked many questions later). A token's contribution
to the output also scales with its value norm, which weights the score.

Simplifications here: the statistics come from the observation window the
runner keeps (the last 32 queries, already rotated at their positions), with a
diagonal covariance and no averaging over future RoPE angles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkv.policies.base import EvictionPolicy, Observation, needs_window


@dataclass
class ExpectedAttentionPolicy(EvictionPolicy):
    """Keep the tokens with the largest expected attention under the recent query statistics.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept.
        window: last tokens always kept.
        value_norm: weight each token by the L2 norm of its value.
        chunk: keep tokens in whole runs of this many, ranked by their mean
            score (ChunkKV, Liu et al. 2025); 1 (default, not measured above 1
            for this method) ranks token by token.
    """

    name = "expected_attention"
    needs_queries: ClassVar[bool] = True
    budget: int = 4096
    sinks: int = 4
    window: int = 32
    value_norm: bool = True
    chunk: int = 1

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: expected attention (mean over the group's heads), times ||v||."""
        q = needs_window(self.name, queries).q.float()  # (H, W, D)
        hkv, _, d = keys.shape
        g = q.shape[0] // hkv
        mu = q.mean(1).view(hkv, g, d)  # (Hkv, G, D)
        s2 = q.var(1, unbiased=False).view(hkv, g, d)
        k = keys.float()
        logits = (torch.bmm(mu, k.transpose(1, 2)) * d**-0.5) + torch.bmm(s2, (k * k).transpose(1, 2)) / (2 * d)
        probs = logits.softmax(-1).mean(1)  # (Hkv, N)
        if self.value_norm:
            probs = probs * values.float().norm(dim=-1)
        return probs
