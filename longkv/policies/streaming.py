"""StreamingLLM: attention sinks + a local window (Xiao et al. 2023, arXiv:2309.17453).

The first ``sinks`` tokens absorb attention mass the softmax must put somewhere;
keeping them beside a window of the most recent tokens keeps a model fluent
over inputs of any length with a fixed cache. Positions are assigned inside
the cache (sinks sit just before the window), so every relative distance stays
below ``budget + chunk_size``, inside the trained window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.policies.base import EvictionPolicy, Observation


@dataclass
class StreamingPolicy(EvictionPolicy):
    """Keep ``sinks`` first tokens and the last ``window`` tokens (``budget = sinks + window``).

    Attributes:
        budget: tokens kept per layer after each compression.
        sinks: attention-sink tokens at the start of the input.
        window: local window; defaults to ``budget - sinks``.

    Raises:
        LongKVError (from :meth:`validate`): budget below ``sinks + window``, or
        ``budget + chunk_size`` beyond the model's trained window.
    """

    name = "streaming"
    budget: int = 4096
    sinks: int = 4
    window: int | None = None

    @property
    def local_window(self) -> int:
        return self.budget - self.sinks if self.window is None else self.window

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        super().validate(model, engine)  # the budget, codec and positions
        span = self.budget + max(engine.chunk_size, self.evict_every)
        if span > model.max_position:
            raise LongKVError(
                f"budget {self.budget} + chunk {engine.chunk_size} = {span} tokens exceeds the model's trained "
                f"window of {model.max_position}: lower the budget (streaming:budget={max(model.max_position - (span - self.budget), 1)}) or the chunk size"
            )

    def check_budget(self) -> None:
        """The model-independent checks of :meth:`validate` (the CLI runs them before loading a model).

        Raises:
            LongKVError: negative sinks, or a budget that leaves no local window after the sinks.
        """
        if self.sinks < 0:
            raise LongKVError(f"sinks must be >= 0, got {self.sinks}: pass e.g. streaming:sinks=4")
        if self.window is not None and self.window < 1:
            raise LongKVError(f"window must be >= 1, got {self.window}: pass e.g. streaming:window=1024, or leave it out "
                              "(the budget after the sinks)")
        if self.window is None and self.local_window < 1:
            raise LongKVError(
                f"budget {self.budget} leaves no local window after {self.sinks} sink tokens: "
                f"raise the budget to at least {self.sinks + 1} (streaming:budget=N; a few thousand tokens is typical)"
            )
        if self.budget < self.sinks + self.local_window:
            least = self.sinks + self.local_window
            raise LongKVError(
                f"budget {self.budget} is below sinks {self.sinks} + window {self.local_window}: "
                f"raise the budget to at least {least} (streaming:budget={least}) or shrink the window"
            )

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        # Sinks first, then the window by recency; anything older than the window last.
        n = positions.numel()
        score = torch.arange(n, dtype=torch.float32, device=positions.device)
        score[: max(n - self.local_window, 0)] = -1.0
        score[: min(self.sinks, n)] = float(n + 1)
        return score

    def compress(self, layer: int, cache: LayerKV, queries: Observation | None = None) -> None:
        # Same result as ranking by score(), without a top-k: the kept set is two ranges.
        n, keep_n = cache.n, self.sinks + self.local_window
        if n <= keep_n:
            return
        dev = cache.device
        cache.keep(torch.cat((torch.arange(self.sinks, device=dev), torch.arange(n - self.local_window, n, device=dev))))

    def dense_kv_upto(self) -> int:
        # Nothing is freed until a layer holds more than sinks + window tokens, and with
        # nothing freed every key keeps its original position.
        return min(self.budget, self.sinks + self.local_window) if self.kv_quant == "none" else 0

    def describe(self) -> str:
        return f"streaming(budget={self.budget}, sinks={self.sinks}, window={self.local_window}{self.describe_storage()})"
