"""The two KV-policy interfaces (see DESIGN.md, "The two policy interfaces").

The engine, not the model, asks the policy at fixed points:

* after each prefill chunk and every ``evict_every`` decode steps it calls
  :meth:`KVPolicy.compress` for every layer; an :class:`EvictionPolicy` scores
  the cached tokens and keeps the best ``budget`` for good;
* before each attention it calls :meth:`KVPolicy.key_positions`: the position
  every cached key should have as seen by the query (``None``: the original
  positions). Keys are cached rotated at their original position, so the
  engine rotates only the keys whose position changes.

A :class:`SelectionPolicy` frees nothing; per query block it picks which pages
to attend to (the selection interface, built on by block-sparse methods).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.kv.cache import KVCache, LayerKV


@dataclass
class KVPolicy(ABC):
    """Base of every policy. Subclasses are dataclasses whose fields are their knobs."""

    name: ClassVar[str] = ""

    @property
    def budget_tokens(self) -> int | None:
        """Most tokens kept per layer after compression (``None``: unbounded)."""
        return None

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        """Raise :class:`~longkv.errors.LongKVError` when the knobs cannot work with this model."""

    def max_context(self, model: ModelConfig) -> int | None:
        """Longest input (prompt + generated tokens) this policy can serve; ``None``: any."""
        return model.max_position

    def compress(self, layer: int, cache: LayerKV, queries: torch.Tensor | None = None) -> None:
        """Shrink ``cache`` in place (default: keep everything).

        queries: (H, W, D) the last rotated queries of this layer (observation
        window), when the policy asked for them with ``needs_queries``.
        """

    needs_queries: ClassVar[bool] = False
    evict_every: ClassVar[int] = 32

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Positions at which attention should see the cached keys.

        positions: (N,) original positions of the cached tokens, increasing.
        Returns (N,) int64 target positions or ``None`` to keep the originals.
        """
        return None

    def describe(self) -> str:
        """Short human-readable form, e.g. ``streaming(budget=4096, sinks=4)``."""
        return self.name


@dataclass
class EvictionPolicy(KVPolicy):
    """Keep the ``budget`` highest-scoring tokens of each layer, free the rest.

    Subclasses implement :meth:`score`. Tokens are ranked by their score summed
    over KV heads (one kept set per layer, so every head holds the same tokens).

    In-cache positions (StreamingLLM, Xiao et al. 2023): with
    ``contiguous_positions`` the kept keys are seen at consecutive positions
    ending at the newest one, so the relative distances the model sees never
    exceed the cache size, even for inputs far longer than its trained window.
    """

    budget: int = 4096
    contiguous_positions: ClassVar[bool] = True

    @property
    def budget_tokens(self) -> int | None:
        return self.budget

    def max_context(self, model: ModelConfig) -> int | None:
        return None if self.contiguous_positions else model.max_position

    @abstractmethod
    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: torch.Tensor | None,
    ) -> torch.Tensor:
        """Importance of each cached token: (Hkv, N) or (N,) float; higher is kept.

        keys, values: (Hkv, N, D); positions: (N,) int64; queries: (H, W, D) or None.
        """

    def compress(self, layer: int, cache: LayerKV, queries: torch.Tensor | None = None) -> None:
        if cache.n <= self.budget:
            return
        k, v, pos = cache.view()
        scores = self.score(layer, k, v, pos, queries)
        if scores.dim() == 2:
            scores = scores.float().sum(0)
        keep = torch.topk(scores, self.budget, sorted=False).indices.sort().values
        cache.keep(keep)

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        if not self.contiguous_positions:
            return None
        n = positions.numel()
        if n == 0 or int(positions[-1] - positions[0]) == n - 1:
            return None  # no gap: nothing moves
        return positions[-1] - torch.arange(n - 1, -1, -1, dtype=torch.int64)


@dataclass
class SelectionPolicy(KVPolicy):
    """Frees nothing; each attention reads sink pages + local window + pages it selects.

    The engine drives it at three points (see ``Runner.prefill`` / ``Runner.decode``):

    * :meth:`new_state` once per sequence, :meth:`reset` at the start of a prompt;
    * :meth:`select` before the last :meth:`question_start`-split part of a prompt
      (the question), to choose pages from the question's queries;
    * :meth:`attend` in every layer, after the new keys are appended.

    Subclasses: ``longkv.policies.block_topk`` (block top-k, MoBA / Quest / InfLLM).
    """

    @abstractmethod
    def new_state(self, model: ModelConfig, engine: EngineConfig) -> Any:
        """Fresh per-sequence state (selection in force, page summaries)."""

    def reset(self, state: Any) -> None:
        """Forget the selection in force (a new prompt starts)."""

    def question_start(self, n_tokens: int) -> int:
        """Index where the question part of an ``n_tokens`` prompt starts (0: no separate selection)."""
        return 0

    def select(self, state: Any, model: Any, cache: KVCache, context: list[int], ids: list[int]) -> None:
        """Choose pages for the question ``ids`` that follows the cached ``context`` tokens."""

    @abstractmethod
    def attend(
        self, state: Any, layer: int, q: torch.Tensor, lkv: LayerKV, q_pos: torch.Tensor, rope: Any
    ) -> torch.Tensor:
        """Attention output (H, T, D) of T queries (H, T, D) whose keys are already appended to ``lkv``."""
