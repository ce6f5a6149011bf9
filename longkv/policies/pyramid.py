"""PyramidKV: per-layer budgets that shrink with depth (Cai et al. 2024, arXiv:2406.02069).

Lower layers spread their attention over the whole input, higher layers focus
on a few tokens ("pyramidal information funneling"), so the same total budget
buys more when lower layers keep more. Budgets form an arithmetic sequence from
``2 * budget - budget / beta`` at layer 0 down to ``budget / beta`` at the last
layer (raised to the scorer's sinks + window when that is more), averaging
``budget`` (to rounding); any scorer ranks the tokens inside each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.errors import LongKVError
from longkv.policies.base import Observation
from longkv.policies.wrapper import ScorerWrapper


@dataclass
class PyramidPolicy(ScorerWrapper):
    """Any scorer under per-layer budgets decreasing with depth (mean ``budget`` per layer).

    Attributes:
        budget: mean tokens kept per layer.
        scorer: spec of the policy that ranks tokens (``snapkv``, ``h2o``, ...).
        beta: ratio of the mean budget to the last layer's budget (the paper's beta).
        n_layers: model depth (set by :meth:`resolve`).

    Raises:
        LongKVError: unknown scorer, beta < 1, or a layer budget below the
            scorer's sinks + window.
    """

    name = "pyramid"
    budget: int = 4096
    beta: float = 20.0
    n_layers: int = 0

    @property
    def budget_tokens(self) -> int | None:
        return self.layer_budget(0) if self.n_layers else self.budget

    def layer_budget(self, layer: int) -> int:
        if self.n_layers < 1:
            raise LongKVError("pyramid needs the model depth: use policy.resolve(model, engine) or pass n_layers=")
        sinks, window = self.inner.protected(self.budget)
        # the last layer keeps budget / beta, but never less than the sinks + window the scorer promises
        low = min(max(self.budget / self.beta, sinks + window, 1), self.budget)
        high = 2 * self.budget - low
        frac = layer / (self.n_layers - 1) if self.n_layers > 1 else 0.5
        return math.floor(high - (high - low) * frac + 0.5)

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        if self.beta < 1:
            raise LongKVError(f"pyramid beta must be >= 1 (got {self.beta}): the last layer keeps budget / beta tokens")
        super().validate(model, engine)

    def model_knobs(self, model: ModelConfig) -> dict[str, Any]:
        return {"n_layers": model.n_layers}

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """The scorer's scores, unchanged: (Hkv, N) or (N,)."""
        return self.inner.score(layer, keys, values, positions, queries)

    def describe(self) -> str:
        return f"pyramid(budget={self.budget}, scorer={self.scorer}, beta={self.beta}{self.describe_storage()})"
