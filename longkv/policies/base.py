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

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.errors import LongKVError
from longkv.kv.cache import KVCache, LayerKV, page_format
from longkv.kv.pool import PageFormat, PagePool

KV_QUANT = ("none", "int8", "int4")


@dataclass
class KVPolicy:
    """Base of every policy (dense behaviour). Subclasses are dataclasses whose fields are their knobs."""

    name: ClassVar[str] = ""
    kv_quant: str = "none"  # KV storage codec: "none" (the compute dtype), "int8" or "int4" (longkv.kv.quant)

    @property
    def budget_tokens(self) -> int | None:
        """Most tokens kept per layer after compression (``None``: unbounded)."""
        return None

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        """Raise :class:`~longkv.errors.LongKVError` when the knobs cannot work with this model (changes nothing)."""

    def resolve(self, model: ModelConfig, engine: EngineConfig) -> KVPolicy:
        """This policy for ``model``: a new object with every model-dependent knob fixed, validated.

        The engine runs resolved policies; the caller's object is never changed.

        Raises:
            LongKVError: an unknown ``kv_quant``, or knobs that cannot work with this model (see :meth:`validate`).
        """
        pol = dataclasses.replace(self, **self.model_knobs(model))
        pol.check_codec()
        pol.validate(model, engine)
        return pol

    def model_knobs(self, model: ModelConfig) -> dict[str, Any]:
        """Knob values that depend on the model (e.g. PyramidKV's depth), for :meth:`resolve`."""
        return {}

    def max_context(self, model: ModelConfig) -> int | None:
        """Longest input (prompt + generated tokens) this policy can serve; ``None``: any."""
        return model.max_position

    def compress(self, layer: int, cache: LayerKV, queries: Observation | None = None) -> None:
        """Shrink ``cache`` in place (default: keep everything).

        queries: the observation queries of this layer (the newest tokens', or a
        probe's), when the policy asked for them with ``needs_queries``.
        """

    needs_queries: ClassVar[bool] = False
    evict_every: ClassVar[int] = 32
    per_head: ClassVar[bool] = False  # KV heads keep different tokens (AdaKV): one single-head store per head
    reconstruct: ClassVar[bool] = False  # scores each prefill chunk by a probe of its repeat (KVzip)

    def layer_budget(self, layer: int) -> int | None:
        """Most tokens ``layer`` keeps after compression (``None``: unbounded); PyramidKV varies it by layer."""
        return self.budget_tokens

    def compress_layers(self, caches: Mapping[int, LayerKV], queries: dict[int, Observation]) -> None:
        """Compress the layers the policy shapes (the runner's entry point): :meth:`compress` layer by layer.

        caches: layer index -> its cache (the model's global layers; sliding-window
        layers keep their own ring and are never given to a policy); queries: layer ->
        observation queries. Policies that decide for all layers at once (one kept set
        shared by the layers) override this.
        """
        for i, lkv in caches.items():
            self.compress(i, lkv, queries.get(i))

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Positions at which attention should see the cached keys.

        positions: (N,) original positions of the cached tokens, increasing.
        Returns (N,) int64 target positions or ``None`` to keep the originals. A policy that moves
        keys (:attr:`moves_keys`) renumbers them: consecutive positions ending at the last one's
        (what the one-call decode kernel assumes, ``longkv.engine.step``).
        """
        return None

    @property
    def moves_keys(self) -> bool:
        """Whether :meth:`key_positions` may ever move a cached key (then decode reads rotate the keys that move)."""
        return False

    def describe(self) -> str:
        """Short human-readable form, e.g. ``streaming(budget=4096, sinks=4)``; the codec when not ``none``."""
        return self.name if self.kv_quant == "none" else f"{self.name}(kv_quant={self.kv_quant})"

    def dense_kv_upto(self) -> int:
        """Tokens up to which this policy provably computes the dense policy's KV, bit for bit (0: never).

        A prefix cache shares KV only between requests whose KV is the dense one: an
        uncoded store that kept every token at its original position. Fail closed: a
        policy says so only when it is certain.
        """
        return 0

    def page_format(self, head_dim: int, dtype: torch.dtype) -> PageFormat:
        """The format of this policy's KV pages (``kv_quant``). Raises LongKVError for an unknown ``kv_quant``."""
        self.check_codec()
        return page_format(head_dim, dtype, self.kv_quant)

    def pages_in_ram(self) -> bool:
        """Whether every KV page this policy's stores hold lives in RAM (False: a tiered store keeps some coded or on disk)."""
        return True

    def check_codec(self) -> None:
        """Raises LongKVError for an unknown ``kv_quant`` (model-independent: checked before a model loads)."""
        if self.kv_quant not in KV_QUANT:
            raise LongKVError(f"unknown kv_quant {self.kv_quant!r}: use one of {', '.join(KV_QUANT)}")

    def new_layer_kv(
        self, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, model: ModelConfig | None = None,
        engine: EngineConfig | None = None, pool: PagePool | None = None,
    ) -> LayerKV:
        """The store for one layer's KV: plain, or int8/int4 pages per ``kv_quant``, over ``pool``'s pages.

        ``pool`` is the engine's pool for this layer and page format (see
        :meth:`page_format`; by default the store has a pool of its own);
        ``model``/``engine`` are for subclasses.

        Raises:
            LongKVError: unknown ``kv_quant``.
        """
        self.check_codec()
        return LayerKV(n_kv_heads, head_dim, page_size, dtype, codec=self.kv_quant, pool=pool)


@dataclass
class EvictionPolicy(KVPolicy, ABC):
    """Keep the ``budget`` highest-scoring tokens of each layer, free the rest.

    Subclasses implement :meth:`score`. Tokens are ranked by their score summed
    over KV heads (one kept set per layer, so every head holds the same tokens).
    The first ``sinks`` and last ``window`` tokens (local window), for the
    subclasses that declare those knobs, are always kept whatever their score.

    In-cache positions (StreamingLLM, Xiao et al. 2023): with
    ``contiguous_positions`` the kept keys are seen at consecutive positions
    ending at the newest one, so the relative distances the model sees never
    exceed the cache size, even for inputs far longer than its trained window.
    ``positions="original"`` keeps every key at its original position instead
    (inputs must then fit the trained window).
    """

    budget: int = 4096
    positions: str = "contiguous"
    contiguous_positions: ClassVar[bool] = True

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"heads": ("sum", "max"), "layers": ("sum", "max"), "scope": ("layer", "shared")}

    def __post_init__(self) -> None:
        """Check the knobs some methods share (``kernel``, ``chunk``, ``heads``, ``layers``, ``scope``) at once.

        Raises:
            LongKVError: an even or non-positive pooling width, a chunk below 1, or an unknown choice.
        """
        kernel = getattr(self, "kernel", None)
        if kernel is not None and (kernel < 1 or kernel % 2 == 0):
            raise LongKVError(f"{self.name} kernel must be an odd number of tokens >= 1 (got {kernel}): e.g. kernel=15, or 1 for no pooling")
        chunk = getattr(self, "chunk", None)
        if chunk is not None and chunk < 1:
            raise LongKVError(f"{self.name} chunk must be a number of tokens >= 1 (got {chunk}): e.g. chunk=8, or 1 to rank tokens one by one")
        for knob, allowed in self._CHOICES.items():
            value = getattr(self, knob, None)
            if value is not None and value not in allowed:
                raise LongKVError(f"unknown {self.name} {knob} {value!r}: use {' or '.join(allowed)}")

    @property
    def budget_tokens(self) -> int | None:
        return self.budget

    def layer_budget(self, layer: int) -> int:
        """Tokens kept in ``layer`` (the same for every layer unless a subclass says otherwise)."""
        return self.budget

    def protected(self, budget: int) -> tuple[int, int]:
        """(sinks, local window) always kept under a layer budget of ``budget`` tokens (knobs ``sinks``, ``window``)."""
        return int(getattr(self, "sinks", 0) or 0), int(getattr(self, "window", 0) or 0)

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        """Raises LongKVError: budget < 1, negative sinks/window, budget below sinks + window, unknown codec or positions."""
        self.check_budget()
        self.check_codec()
        if self.positions not in ("contiguous", "original"):
            raise LongKVError(f"unknown positions {self.positions!r}: use contiguous or original")

    def check_budget(self) -> None:
        """The model-independent part of :meth:`validate` (the CLI runs it before loading a model).

        Raises:
            LongKVError: budget < 1, negative sinks/window, or budget below sinks + window.
        """
        sinks, window = self.protected(self.budget)
        if self.budget < 1 or sinks < 0 or window < 0:
            raise LongKVError(
                f"{self.name} needs budget >= 1 and sinks, window >= 0, got budget={self.budget}, "
                f"sinks={sinks}, window={window}: pass e.g. {self.name}:budget=2048"
            )
        if self.budget < sinks + window:
            raise LongKVError(
                f"{self.name} budget {self.budget} is below the sinks {sinks} + local window {window} it always "
                f"keeps: raise the budget to at least {sinks + window} ({self.name}:budget={sinks + window}) or lower sinks/window"
            )

    def max_context(self, model: ModelConfig) -> int | None:
        return None if self._contiguous else model.max_position

    @property
    def _contiguous(self) -> bool:
        return self.contiguous_positions and self.positions == "contiguous"

    @abstractmethod
    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """Importance of each cached token: (Hkv, N) or (N,) float; higher is kept.

        keys, values: (Hkv, N, D); positions: (N,) int64; queries: the observation or None.
        """

    def select(self, layer: int, cache: LayerKV, queries: Observation | None, budget: int) -> torch.Tensor | None:
        """Sorted (budget,) int64 indices of the tokens to keep, or ``None`` when all fit."""
        n = cache.n
        if n <= budget:
            return None
        k, v, pos = cache.view()
        scores = self.score(layer, k, v, pos, queries).float()
        if scores.dim() == 2:
            scores = scores.sum(0)
        return self.top(scores, budget)

    def top(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Sorted (budget,) indices of the best tokens by ``scores`` (N,), sinks and local window always in.

        With a ``chunk`` knob above 1 (ChunkKV, Liu et al. 2025), whole runs of
        ``chunk`` consecutive cached tokens are kept, ranked by their mean score,
        so the tokens of a number or a name mostly stay or go together (the
        last run taken keeps its best tokens).
        """
        scores = protect(scores, *self.protected(budget))
        chunk = int(getattr(self, "chunk", 1))
        if chunk > 1 and budget < scores.numel():
            return chunk_top(scores, budget, chunk)
        return torch.topk(scores, budget, sorted=False).indices.sort().values

    def compress(self, layer: int, cache: LayerKV, queries: Observation | None = None) -> None:
        keep = self.select(layer, cache, queries, self.layer_budget(layer))
        if keep is not None:
            cache.keep(keep)

    @property
    def moves_keys(self) -> bool:
        return self._contiguous

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor | None:
        if not self._contiguous:
            return None
        n = positions.numel()
        if n == 0 or int(positions[-1] - positions[0]) == n - 1:
            return None  # no gap: nothing moves
        return positions[-1] - torch.arange(n - 1, -1, -1, dtype=torch.int64, device=positions.device)

    def describe(self) -> str:
        """``name(budget=.., sinks=.., window=.., <the method's other knobs>)``; codec and positions when not the defaults."""
        sinks, window = self.protected(self.budget)
        skip = {"budget", "sinks", "window", "kv_quant", "positions"}
        extra = "".join(f", {f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.init and f.name not in skip)
        return f"{self.name}(budget={self.budget}, sinks={sinks}, window={window}{extra}{self.describe_storage()})"

    def describe_storage(self) -> str:
        """``, kv_quant=.., positions=..`` for the knobs not at their defaults (the tail of :meth:`describe`)."""
        out = f", kv_quant={self.kv_quant}" if self.kv_quant != "none" else ""
        return out + (f", positions={self.positions}" if self.positions != "contiguous" else "")


@dataclass
class AccumulatedScorePolicy(EvictionPolicy, ABC):
    """Rank tokens by a score accumulated over every compression, kept per token in ``LayerKV.acc``.

    At each :meth:`compress` the observation queries score every cached token
    (:meth:`score`) and the score is folded into the token's running total
    (``accumulate = "sum"``, H2O) or running maximum (``"max"``, KVzip); the
    (Hkv, N) float32 totals move and are freed with their tokens. Tokens are
    ranked by the totals summed over KV heads (or their maximum, for a
    subclass with ``heads = "max"``), max-pooled over ``kernel`` neighbours
    when a subclass has that knob.
    """

    accumulate: ClassVar[str] = "sum"

    def compress(self, layer: int, cache: LayerKV, queries: Observation | None = None) -> None:
        # Fold in at every call (not only when something must go), then rank by the totals.
        self.fold(layer, cache, queries)
        super().compress(layer, cache, queries)

    def fold(self, layer: int, cache: LayerKV, queries: Observation | None) -> None:
        """Fold the observation's scores into ``cache.acc`` (sum or running max)."""
        if queries is not None and cache.n:
            k, v, pos = cache.view()
            new = self.score(layer, k, v, pos, queries).float()
            old = cache.acc if cache.acc is not None else torch.zeros(new.shape[0], 0, device=new.device)
            old = torch.nn.functional.pad(old, (0, cache.n - old.shape[1]))
            cache.acc = old + new if self.accumulate == "sum" else torch.maximum(old, new)

    def token_scores(self, cache: LayerKV) -> torch.Tensor:
        """(N,) float32 ranking of the cached tokens: the totals combined over KV heads (sum or max)."""
        acc = cache.acc if cache.acc is not None else torch.zeros(1, 0, device=cache.device)
        acc = torch.nn.functional.pad(acc, (0, cache.n - acc.shape[1]))
        return acc.amax(0) if getattr(self, "heads", "sum") == "max" else acc.sum(0)

    def compress_layers(self, caches: Mapping[int, LayerKV], queries: dict[int, Observation]) -> None:
        if getattr(self, "scope", "layer") != "shared":
            super().compress_layers(caches, queries)
            return
        if not caches:
            return
        # One kept set for every layer: each layer's scores as shares of that layer's total,
        # combined over layers by sum or max (``layers``): a token that matters in any layer is kept in all.
        for i, lkv in caches.items():
            self.fold(i, lkv, queries.get(i))
        first = next(iter(caches))
        n = caches[first].n
        budget = self.layer_budget(first)
        if n <= budget:
            return
        shares = torch.stack([s / s.sum().clamp_min(1e-30) for s in map(self.token_scores, caches.values())])  # (L, N)
        total = shares.amax(0) if getattr(self, "layers", "sum") == "max" else shares.sum(0)
        keep = self.pick(total, budget)
        for lkv in caches.values():
            lkv.keep(keep)

    def pick(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Sorted (budget,) indices of the best tokens by ``scores`` (N,), after pooling and protection."""
        kernel = int(getattr(self, "kernel", 1))
        if kernel > 1:  # keep the neighbours of a high-scoring token with it (whole phrases)
            scores = torch.nn.functional.max_pool1d(scores[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
        return self.top(scores, budget)

    def select(self, layer: int, cache: LayerKV, queries: Observation | None, budget: int) -> torch.Tensor | None:
        if cache.n <= budget:
            return None
        return self.pick(self.token_scores(cache), budget)


def chunk_rank(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N,) the mean score of each token's run of ``chunk`` tokens (runs start at 0), over the run's finite
    scores; +inf where ``scores`` (N,) is +inf (protected tokens stay first)."""
    n = scores.numel()
    fixed = scores == math.inf
    pad = (-n) % chunk
    counts = torch.nn.functional.pad((~fixed).float(), (0, pad)).view(-1, chunk).sum(1)
    sums = torch.nn.functional.pad(torch.where(fixed, torch.zeros_like(scores), scores), (0, pad)).view(-1, chunk).sum(1)
    means = (sums / counts.clamp_min(1)).repeat_interleave(chunk)[:n]
    return torch.where(fixed, torch.full_like(scores, math.inf), means)


def ranked(scores: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(N,) indices ordered by ``rank`` (N,) then by ``scores`` (N,), both descending."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[torch.argsort(rank[order], descending=True, stable=True)]


def chunk_top(scores: torch.Tensor, budget: int, chunk: int) -> torch.Tensor:
    """Sorted (budget,) indices: the +inf (protected) tokens of ``scores`` (N,), then whole runs of ``chunk`` tokens
    by their mean score over the unprotected tokens, best first; within the last run taken, its best tokens."""
    return ranked(scores, chunk_rank(scores, chunk))[:budget].sort().values


def protect(scores: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Scores (..., N) with the first ``sinks`` and last ``window`` tokens raised to +inf (always kept)."""
    n = scores.shape[-1]
    scores = scores.clone()
    scores[..., : min(sinks, n)] = math.inf
    if window > 0:
        scores[..., max(n - window, 0) :] = math.inf
    return scores


@dataclass(frozen=True)
class Observation:
    """The queries a policy scores one layer's cached tokens with.

    Attributes:
        q: (H, W, D) rotated queries.
        positions: (W,) int64, the positions the queries were computed at. The
            newest W tokens of the sequence (the runner keeps them) see the keys
            up to their own position; a probe (``Runner.probe_work``: the question, or a
            repeat of the chunk for KVzip) is fed after every cached token and sees
            them all.
    """

    q: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def newest(cls, q: torch.Tensor, last_position: int) -> Observation:
        """The queries (H, W, D) of the W tokens ending at ``last_position``."""
        w = q.shape[1]
        return cls(q, torch.arange(last_position - w + 1, last_position + 1, dtype=torch.int64, device=q.device))

    def last(self, w: int) -> Observation:
        """The newest ``w`` queries."""
        return Observation(self.q[:, -w:], self.positions[-w:])

    def heads(self, lo: int, hi: int) -> Observation:
        """Query heads [lo, hi) (the group of one KV head)."""
        return Observation(self.q[lo:hi], self.positions)


def window_attention(keys: torch.Tensor, obs: Observation, positions: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Attention of the observation queries over the cached keys, per KV head.

    Query ``i`` sees the keys whose original position is at most
    ``obs.positions[i]`` (causal; a probe after the cache sees every key).
    Softmax in float32, then the query heads that share a KV head (GQA) are
    reduced by ``reduce`` (mean or max).

    keys: (Hkv, N, D) rotated; positions: (N,) int64 of the keys.
    Returns (Hkv, W, N) float32 attention probabilities (each row of each head sums to 1).
    """
    hkv, n, d = keys.shape
    h, w, _ = obs.q.shape
    g = h // hkv
    q = obs.q.float().reshape(hkv, g * w, d)
    logits = torch.bmm(q, keys.float().transpose(1, 2)).mul_(d**-0.5).view(hkv, g, w, n)
    hidden = positions[None, :] > obs.positions[:, None]  # (W, N)
    if bool(hidden.any()):
        logits.masked_fill_(hidden, -math.inf)
    probs = logits.softmax(-1)
    return probs.amax(1) if reduce == "max" else probs.mean(1)


def needs_window(name: str, queries: Observation | None) -> Observation:
    """``queries`` or an assertion: attention-based scorers run only with an observation window."""
    assert queries is not None, f"{name} scores with the observation-window queries (needs_queries)"
    return queries


# ---------------------------------------------------------------------- needs
# A selection policy never runs the model. At the question its ``select`` is a
# generator that yields what it needs computed (one need at a time) and is sent
# the result; the engine runs each need as work of its own in the step loop, in
# the same batched forward as every other sequence's tokens.

# (layer, q (H, T, D), the layer's KV with the probe's keys appended, q positions (T,)) -> (H, T, D)
ProbeRead = Callable[[int, torch.Tensor, LayerKV, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeQueries:
    """Need: the queries of ``ids`` fed right after the sequence's cached tokens.

    Every layer appends the probe's keys, reads what ``read`` attends to and
    records its queries; afterwards the cache is cut back (nothing of the probe
    stays). Result: ``list[Tensor]``, per layer the queries (H, T, D).
    """

    ids: list[int]
    read: ProbeRead


@dataclass(frozen=True)
class EncodeText:
    """Need: the keys and values of ``ids`` read densely as a text of their own (positions 0..T-1).

    Result: ``list[tuple[Tensor, Tensor]]``, per layer keys and values (Hkv, T, D),
    keys rotated at their positions; the sequence's cache is not touched.
    """

    ids: list[int]


@dataclass(frozen=True)
class GreedyConfidence:
    """Need: how confidently the model continues each text: the mean log-probability
    of its ``n`` greedy tokens, each text read densely on its own (positions 0..T-1).

    Result: ``list[float]``, one per text; the sequence's cache is not touched.
    """

    texts: list[list[int]]
    n: int


Need = ProbeQueries | EncodeText | GreedyConfidence
SelectPlan = Generator[Need, Any, None]


class SelectionState:
    """Per-sequence state of a selection policy (a policy's own subclass holds the rest).

    Attributes:
        dense: the current prompt is read densely (short enough that selecting saves nothing).
        question_tokens: how many of the prompt's last tokens are the question itself and the
            template after it (the request's ``question_ids``, set by the engine for each prompt);
            0: unknown, every query of the question part chooses.
    """

    dense: bool = False
    question_tokens: int = 0


@dataclass
class SelectionPolicy(KVPolicy, ABC):
    """Frees nothing; each attention reads sink pages + local window + pages it selects.

    The engine drives it at three points (see ``Runner.prefill`` / ``Runner.decode``):

    * :meth:`new_state` once per sequence, :meth:`reset` at the start of a prompt;
    * :meth:`select` before the last :meth:`question_start`-split part of a prompt
      (the question), to choose pages from the question's queries: a generator of
      :data:`Need` s (probe queries, short dense texts) that the engine schedules
      as work of their own, so the policy never runs the model;
    * :meth:`attend` in every layer, after the new keys are appended.

    Subclasses: ``longkv.policies.block_topk`` (block top-k, MoBA / Quest / InfLLM).
    """

    @abstractmethod
    def new_state(self, model: ModelConfig, engine: EngineConfig) -> SelectionState:
        """Fresh per-sequence state (selection in force, page summaries)."""

    def reset(self, state: Any, n_tokens: int = 0) -> None:
        """Forget the selection in force: a new prompt of ``n_tokens`` starts (0: length unknown)."""

    def question_start(self, n_tokens: int, state: Any = None) -> int:
        """Index where the question part of an ``n_tokens`` prompt starts (0: no separate selection)."""
        return 0

    def select(self, state: Any, model: ModelConfig, cache: KVCache, context: list[int], ids: list[int], ropes: Any) -> SelectPlan:
        """Choose pages for the question ``ids`` that follows the cached ``context`` tokens.

        A generator: it yields the :data:`Need` s whose results it chooses from (the
        engine sends each result back) and stores the choice in ``state``; the cache
        is left as it was. ``ropes``: the sequence's rotary embedding of each layer (indexed by layer).
        """
        return
        yield

    @abstractmethod
    def attend(
        self, state: Any, layer: int, q: torch.Tensor, lkv: LayerKV, q_pos: torch.Tensor, rope: Any
    ) -> torch.Tensor:
        """Attention output (H, T, D) of T queries (H, T, D) whose keys are already appended to ``lkv``."""

    def reads_in_place(self, state: Any, layer: int, lkv: LayerKV) -> bool:
        """Whether the next decode token's read of ``layer`` is parts a kernel can read in place
        (:meth:`in_place_parts`), so the step can run in one call (see ``longkv.engine.runner``). No by default."""
        return False

    def in_place_parts(self, state: Any, layer: int, lkv: LayerKV, rope: Any, position: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Where :meth:`reads_in_place`, once the new token at ``position`` has its slot in ``lkv``: the parts it
        reads before the cache's own tokens, keys (Hkv, P, D) rotated to where they are seen and values (rows
        contiguous), and the first cached token it reads from there to the end. The same attention as :meth:`attend`."""
        raise NotImplementedError(f"{type(self).__name__} reads nothing in place")
