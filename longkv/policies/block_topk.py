"""Block top-k: query-aware page selection with training-free context extension.

Sources: MoBA (Lu et al. 2025, mean-key gate over blocks), Quest (Tang et al.
2024, per-page min/max bound, query-aware page choice), InfLLM (Xiao et al.
2024, retrieved blocks placed inside the trained position range), StreamingLLM
(Xiao et al. 2023, sink tokens + local window).

How an input far longer than the model's trained window is read:

1. **Bounded prefill.** Every prompt chunk but the question attends to the sink
   pages + its local window (+ ``prefill_topk`` pages chosen per layer from the
   chunk's own queries, 0 by default), so prefill cost grows linearly with the
   input. Nothing is freed: every page stays in the cache to be retrieved.
2. **Selection at the question.** The last ``query_tokens`` tokens of the
   prompt (the question and the chat template's answer prefix) are run once
   against sinks + window to collect their queries in every layer; when the
   request names its question (``question_ids`` ending the prompt, as ``ask``
   passes it), only the question's own queries and the template's after it
   are kept. Every candidate page is scored, for each query, by the log-sum-exp of its logits
   q.k / sqrt(D) (``score="lse"``), with the page rotated to the position it
   will get (just beyond the window): the log of the attention mass attention
   would really give it. Each (layer, KV head, query) row turns these into the
   share of attention each page would get (softmax over the candidate pages,
   ``aggregate="mass"``); with ``scope="shared"`` one top-k selection serves
   every layer and head, and a page's score is the mean over the model's
   calibrated retrieval heads (``heads``, ``longkv.policies.retrieval_heads``)
   of the log of the share each head's queries would give it, or, for a model
   without calibration, the mean of its ``votes`` best shares over all rows.
3. **Answer.** The question tail is run again, now attending to sinks +
   selected pages + window, and (``keep_selection``) every answer token keeps
   that selection. Positions are assigned so every distance stays inside the
   trained window (see ``longkv.attention.sparse``).

Scoring with the mean key without RoPE (MoBA's gate as trained) does not find
the needle in SmolLM2; the RoPE-consistent maximum does, and few pages (k = 1 or 2)
answer better than many (distractor pages): see docs/sparse.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longkv.attention.dense import attend
from longkv.attention.sparse import SCORES, attend_pages, candidate_pages, page_scores, window_start
from longkv.config import EngineConfig, ModelConfig
from longkv.errors import LongKVError
from longkv.kv.cache import KVCache, LayerKV
from longkv.kv.pool import PagePool
from longkv.kv.summaries import PageSummaries
from longkv.kv.tiers import CODECS, COLD, TieredLayerKV, parse_bytes
from longkv.models.layers import Rotary
from longkv.policies.base import EncodeText, GreedyConfidence, ProbeQueries, SelectionPolicy, SelectionState, SelectPlan
from longkv.policies.page_votes import merge_votes, top_pages, vote, zscore
from longkv.policies.retrieval_heads import check_heads, resolve_heads

SCOPES = ("shared", "layer", "head")
AGGREGATES = ("mass", "z")


@dataclass
class BlockTopKState(SelectionState):
    """Per-sequence state: the selection in force and the page summaries.

    Attributes:
        pages: per layer, (G, k) int64 selected page ids (G = 1 or Hkv), or None.
        summaries: per layer, page summaries (built only when a score needs them).
        candidates: (C,) page ids that could be chosen at the last question.
        z: (L, Hkv, C) float32 per-head page scores at the last question (the
            vote over that head's queries; for page-recall measurements), or None
            (no selection, or the retrieval heads chose and only their layers were scored).
        score: (C,) the shared score of the candidates at the last question (scope "shared");
            with ``verify``, the verified pages rank by their answer's confidence, above all others.
        first_score: (C,) the score before verification.
        confidence: (m,) with ``verify``: the mean log-probability of the answer read from
            each verified page, in the order of ``first_score`` (best first).
        prefix: per layer, the sink pages + selected pages re-encoded together:
            keys, values (Hkv, P, D) (keys rotated at 0..P-1), original positions (P,).
        seen: per layer, a prefix's keys rotated to where the window sees them: (the prefix's
            keys, the shift, the rotated keys) (see ``BlockTopKPolicy.seen_prefix``).
        anchor: window start when the selection was made (None: no selection).
        max_local: most tokens the local window may hold before it slides
            (``window + page_size + block``, the block term of the validated span).
        dense_upto: prompts of at most this many tokens (the span or ``dense_below``) are read densely.
        max_position: the model's trained window (dense reading stops there).
        dense: the current prompt is read densely (set by ``reset``).
        topk: the policy's ``topk`` resolved for this model (``BlockTopKPolicy.k``).
    """

    pages: list[torch.Tensor | None]
    summaries: list[PageSummaries]
    max_local: int
    dense_upto: int = 0
    max_position: int = 0
    dense: bool = False
    topk: int = 1
    anchor: int | None = None
    candidates: torch.Tensor | None = None
    z: torch.Tensor | None = None
    score: torch.Tensor | None = None
    first_score: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    prefix: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    seen: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class BlockTopKPolicy(SelectionPolicy):
    """Attend to sink pages + local window + the top-k pages by RoPE-consistent score.

    Block selection as in MoBA (Lu et al. 2025) and Quest (Tang et al. 2024),
    retrieved pages placed just beyond the local window as in InfLLM (Xiao et
    al. 2024), sink tokens from StreamingLLM (Xiao et al. 2023); pages chosen by
    retrieval heads (Wu et al. 2024). Page size is the engine's (``LLM(page_size=...)``, 64 tokens by default).

    Attributes:
        topk: pages retrieved at the question and kept for the answer (each
            brings its ``expand`` neighbours; ``margin`` may add close ones). ``None`` (default, written
            ``topk=auto``): 1 when the model's calibrated retrieval heads choose
            the pages (their choice ranks the needle's page first in nearly every
            question, and every further page is a distractor the model may copy
            from), else 2 (every row votes: the needle's page came second in 3
            of 18 questions at 32 K, docs/sparse.md).
        sinks: sink tokens at the start of the input, rounded up to whole pages.
        window: local window in tokens; its tokens keep their true distances.
        score: ``"lse"`` (log of the page's attention mass, default), ``"max"``
            (exact max q.k), ``"mean"`` (mean-key gate, MoBA) or ``"minmax"``
            (Quest bound); all RoPE-consistent.
        aggregate: how a (layer, KV head, query) row rates the pages before the
            votes: ``"mass"`` (default: softmax over the candidate pages, the share
            of attention each page would get) or ``"z"`` (z-score over the pages).
        scope: ``"shared"`` (one selection for all layers and heads, default),
            ``"layer"`` (one per layer) or ``"head"`` (one per layer and KV head).
        keep_selection: keep the question's selection for every answer token;
            off: each decode step re-selects per layer from its own query.
        query_tokens: prompt tokens at the end whose queries choose the pages
            (the question and the chat template's answer prefix). When the request
            names its question (``question_ids``, as ``ask`` does), only the question's
            own tokens and the template after it choose: the heading and document text
            before a short question point at look-alike pages (page recall on real
            questions, docs/sparse.md).
        votes: a page's score is the mean of its ``votes`` best ratings over
            (layer, KV head, query) rows: a page must stand out for several
            queries or heads, not one noisy row.
        reencode: with ``scope="shared"``, encode the sink pages + selected pages
            again as one short text at the question and answer from those keys
            and values (the cached ones come from a local-window prefill).
        prefill_topk: pages each prompt chunk retrieves (per layer, from its own
            queries) on top of sinks + window; 0 keeps prefill strictly local.
        expand: pages on each side of a chosen page retrieved with it (scopes
            ``shared`` and ``layer``): a sentence cut by a page boundary is read
            whole. At most ``topk * (1 + 2 * expand)`` pages are attended.
        resident: KV bytes kept in RAM over all layers, e.g. ``"1GiB"`` (empty:
            everything in RAM, uncoded). Sink pages and the newest tokens that
            fit stay in RAM in the compute dtype; older pages go to the ``cold``
            tier, coded with ``cold_codec``, and are loaded when scored or
            selected (``longkv.kv.tiers``).
        cold: ``"disk"`` (a file in ``tier_dir``, default ``$LONGKV_HOME/kv``;
            RAM stays within ``resident``) or ``"ram"`` (coded pages in RAM on
            top of the hot set: int8 ~0.56x, int4 ~0.31x the bfloat16 bytes).
        cold_codec: ``"int8"``, ``"int4"`` or ``"none"`` for cold pages.
        tier_dir: an existing folder for the disk tier's page files (deleted on exit; default ``$LONGKV_HOME/kv``).
        dense_fallback: read a prompt no longer than the span (what block_topk
            would attend to anyway) or than ``dense_below`` densely, without
            selection (exact, and faster where sparsity cannot pay).
        dense_below: tokens up to which a prompt is read densely even past the
            span (never past the model's trained window). 3072: where sparse
            prefill overtook our dense prefill with SmolLM2-135M and
            Qwen2.5-Coder-0.5B on 2 CPU cores (0.84-0.97x dense at 2 K,
            1.03-1.09x at 3 K; docs/sparse.md).
        verify: with ``scope="shared"``, answer from each of the ``verify`` best
            pages on its own (the sink pages + the page and its ``expand``
            neighbours + the question, one short dense forward and
            ``verify_tokens`` greedy tokens) and keep the ``topk`` pages whose
            answer the model is most confident of (mean log-probability of its
            greedy tokens); 0 (default) turns it off. A page holding the answer
            is copied from with near certainty, a page without it gives a guess;
            but a page holding a look-alike fact is copied from as confidently,
            so it helps a lone needle and hurts among several (docs/sparse.md).
        verify_tokens: greedy tokens read per verified page.
        heads: which query heads choose the pages with ``scope="shared"``:
            ``"auto"`` (default: the model's calibrated retrieval heads when
            longkv knows them, ``longkv.policies.retrieval_heads``, else every
            row), ``"all"`` (every (layer, KV head, query) row votes) or a list
            ``LAYER.HEAD+LAYER.HEAD...``. With heads, a page's score is the mean
            over them of the log of the share of attention each head's queries
            would give it (Wu et al. 2024, retrieval heads).
        margin: with ``scope="shared"``, pages beyond the ``topk`` best are read too when
            their score is within ``margin`` of the best page's, in natural-log units of
            the attention share (0.5: at least ~61 % of the best page's share), up to
            ``topk_max`` pages in all: a question about several facts (several keys,
            several values) reads a page for each, while a lone fact's page, which
            stands out, is read alone. 0 turns it off (exactly ``topk`` pages), and so
            does ``verify`` (the verified pages rank by confidence instead).
        topk_max: most pages ``margin`` may bring (each with its ``expand`` neighbours);
            never fewer than ``topk``.

    Raises:
        LongKVError (from :meth:`validate`): a knob out of range, an unknown score
        or scope, or an attention span beyond the model's trained window.
    """

    name: ClassVar[str] = "block_topk"
    topk: int | None = None
    sinks: int = 64
    window: int = 1024
    score: str = "lse"
    aggregate: str = "mass"
    scope: str = "shared"
    keep_selection: bool = True
    query_tokens: int = 32
    votes: int = 10
    reencode: bool = True
    prefill_topk: int = 0
    expand: int = 1
    resident: str = ""
    cold: str = "disk"
    cold_codec: str = "int8"
    tier_dir: str = ""
    dense_fallback: bool = True
    dense_below: int = 3072
    verify: int = 0
    verify_tokens: int = 16
    heads: str = "auto"
    margin: float = 0.5
    topk_max: int = 4

    # ------------------------------------------------------------------ setup
    def sink_tokens(self, page_size: int) -> int:
        return -(-self.sinks // page_size) * page_size

    def k(self, model: ModelConfig | None = None) -> int:
        """Pages retrieved at the question: ``topk``, or with ``topk=None`` 1 when ``model``'s
        calibrated retrieval heads choose them, else 2 (without ``model``: 2, the most
        ``topk=None`` can mean; :meth:`resolve` fixes the value for the model)."""
        if self.topk is not None:
            return self.topk
        return 1 if model is not None and self.scope == "shared" and resolve_heads(self.heads, model) else 2

    def most_pages(self, model: ModelConfig | None = None) -> int:
        """Most pages the question may choose: ``topk``, or up to ``topk_max`` when ``margin`` is on (scope shared)."""
        k = self.k(model)
        return max(k, self.topk_max) if self.margin > 0 and self.scope == "shared" and not self.verify and k > 0 else k

    def model_knobs(self, model: ModelConfig) -> dict[str, Any]:
        return {"topk": self.k(model)}

    def span(self, engine: EngineConfig, model: ModelConfig | None = None) -> int:
        """Longest distance a query can see, in tokens (sinks + pages + window + one page + block)."""
        ps = engine.page_size
        block = max(engine.chunk_size, self.query_tokens)
        pages = max(self.most_pages(model) * (1 + 2 * self.expand), self.prefill_topk)
        return self.sink_tokens(ps) + pages * ps + self.window + ps + block

    def __post_init__(self) -> None:
        self.check_knobs()  # bad knobs fail when the policy is built, before any model is loaded

    def check_knobs(self) -> None:
        """Raise :class:`~longkv.errors.LongKVError` on a knob that is wrong for any model."""
        for knob in ("topk", "prefill_topk", "sinks", "expand", "verify", "dense_below", "margin"):
            if (getattr(self, knob) or 0) < 0:
                raise LongKVError(f"block_topk {knob} must be >= 0, got {getattr(self, knob)}: pass a non-negative value")
        for knob in ("window", "query_tokens", "votes", "verify_tokens", "topk_max"):
            if getattr(self, knob) < 1:
                raise LongKVError(f"block_topk {knob} must be >= 1, got {getattr(self, knob)}: raise it")
        if self.score not in SCORES:
            raise LongKVError(f"unknown block_topk score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.aggregate not in AGGREGATES:
            raise LongKVError(f"unknown block_topk aggregate {self.aggregate!r}: choose one of {', '.join(AGGREGATES)}")
        if self.scope not in SCOPES:
            raise LongKVError(f"unknown block_topk scope {self.scope!r}: choose one of {', '.join(SCOPES)}")
        check_heads(self.heads)
        if self.cold not in COLD:
            raise LongKVError(f"unknown block_topk cold tier {self.cold!r}: choose one of {', '.join(COLD)}")
        if self.cold_codec not in CODECS:
            raise LongKVError(f"unknown block_topk cold_codec {self.cold_codec!r}: choose one of {', '.join(CODECS)}")
        if self.resident:
            parse_bytes(self.resident)  # raises on a bad size
        else:
            unused = [f"{k}={getattr(self, k)}" for k, d in (("cold", "disk"), ("cold_codec", "int8"), ("tier_dir", "")) if getattr(self, k) != d]
            if unused:
                raise LongKVError(
                    f"block_topk {', '.join(unused)} only applies to a tiered cache: add resident=SIZE "
                    f"(e.g. block_topk:resident=1GiB,{unused[0]}), or drop it"
                )

    def validate(self, model: ModelConfig, engine: EngineConfig) -> None:
        self.check_knobs()
        resolve_heads(self.heads, model)  # raises on a head the model does not have
        if self.resident:
            self.hot_tokens(model, engine)  # raises on a size too small for sinks + window + chunk
        span = self.span(engine, model)
        if span > model.max_position:
            raise LongKVError(
                f"block_topk attends over up to {span} positions (sinks + topk pages + window + chunk), beyond the "
                f"model's trained window of {model.max_position}: lower topk (or topk_max, or margin=0), window or the chunk size"
            )

    def hot_tokens(self, model: ModelConfig, engine: EngineConfig, itemsize: int = 2) -> int:
        """Newest tokens per layer kept in RAM under ``resident`` (with ``itemsize``-byte K/V).

        Raises:
            LongKVError: ``resident`` is not a size, or too small to hold the sinks,
            the local window and one prompt chunk in every layer.
        """
        ps = engine.page_size
        least = self.window + 2 * ps + max(engine.chunk_size, self.query_tokens)
        per_token = 2 * model.n_kv_heads * model.head_dim * itemsize + 8  # K + V + position
        if self.cold == "ram":
            return least
        per_layer = parse_bytes(self.resident) // model.n_layers
        # RAM per layer: sinks + hot tail + one chunk appended before the spill
        hot = (per_layer // per_token - self.sink_tokens(ps) - max(engine.chunk_size, self.query_tokens)) // ps * ps
        if hot < least:
            need = (least + self.sink_tokens(ps) + max(engine.chunk_size, self.query_tokens)) * per_token * model.n_layers
            raise LongKVError(
                f"block_topk resident={self.resident} cannot hold the sinks, window and a chunk in RAM "
                f"(needs >= {-(-need // 2**20)} MiB for this model): raise resident or lower window"
            )
        return hot

    def new_layer_kv(
        self, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, model: ModelConfig | None = None,
        engine: EngineConfig | None = None, pool: PagePool | None = None,
    ) -> LayerKV:
        """Pages of ``pool``, or with ``resident`` set a tiered store (sinks + hot tail in RAM, cold pages coded)."""
        if not self.resident or model is None or engine is None:
            return super().new_layer_kv(n_kv_heads, head_dim, page_size, dtype, pool=pool)
        return TieredLayerKV(
            n_kv_heads, head_dim, page_size, dtype, pinned_tokens=self.sink_tokens(page_size),
            hot_tokens=self.hot_tokens(model, engine, dtype.itemsize), cold=self.cold, codec=self.cold_codec,
            min_hot=self.window + 2 * page_size + max(engine.chunk_size, self.query_tokens),
            directory=self.tier_dir or None, device=engine.device,
        )

    def pages_in_ram(self) -> bool:
        return not self.resident

    def max_context(self, model: ModelConfig) -> int | None:
        return None  # every distance stays inside the span checked by validate()

    def describe(self) -> str:
        tiers = f", resident={self.resident}, cold={self.cold}, cold_codec={self.cold_codec}" if self.resident else ""
        return (
            f"block_topk(topk={self._describe_topk()}, sinks={self.sinks}, window={self.window}, score={self.score}, aggregate={self.aggregate}, "
            f"scope={self.scope}, heads={self.heads}, expand={self.expand}, keep_selection={self.keep_selection}, reencode={self.reencode}"
            + (f", margin={self.margin:g}, topk_max={self.topk_max}" if self.margin > 0 else ", margin=0")
            + (f", verify={self.verify}, verify_tokens={self.verify_tokens}" if self.verify else "")
            + f"{tiers})"
        )

    def _describe_topk(self) -> str:
        return "auto" if self.topk is None else str(self.topk)  # resolved: what ran, so the line works as a spec

    def dense_upto(self, engine: EngineConfig, model: ModelConfig) -> int:
        """Tokens up to which a prompt is read densely: max(span, ``dense_below``) within the trained window (0: never)."""
        if not self.dense_fallback:
            return 0
        return min(max(self.span(engine, model), self.dense_below), model.max_position)

    def new_state(self, model: ModelConfig, engine: EngineConfig) -> BlockTopKState:
        ps, n = engine.page_size, model.n_layers
        return BlockTopKState(
            [None] * n,
            [PageSummaries(model.n_kv_heads, model.head_dim, ps, engine.device) for _ in range(n)],
            self.window + ps + max(engine.chunk_size, self.query_tokens),
            dense_upto=self.dense_upto(engine, model),
            max_position=model.max_position,
            topk=self.k(model),
        )

    def reset(self, state: BlockTopKState, n_tokens: int = 0) -> None:
        state.pages = [None] * len(state.pages)
        state.anchor = None
        state.prefix = None
        state.seen = {}
        # A prompt no longer than what block_topk would attend to anyway (its span) is read
        # densely: nothing would be left out, and selection would only add its fixed cost.
        state.dense = 0 < n_tokens <= state.dense_upto

    def question_start(self, n_tokens: int, state: BlockTopKState | None = None) -> int:
        if state is not None and 0 < n_tokens <= state.dense_upto:
            return 0  # dense fallback: no separate selection
        return max(n_tokens - self.query_tokens, 0)

    # ------------------------------------------------------------------ attention
    def attend(
        self, state: BlockTopKState, layer: int, q: torch.Tensor, lkv: LayerKV, q_pos: torch.Tensor, rope: Rotary
    ) -> torch.Tensor:
        """Attention of one layer for T new tokens (already appended to ``lkv``): (H, T, D)."""
        if state.dense and lkv.n <= state.max_position:
            keys, values, kpos = lkv.read(0, lkv.n)
            assert values is not None
            return attend(q, keys, values, q_pos, kpos, pad=False)
        sinks = self.sink_tokens(lkv.page_size)
        pages = state.pages[layer]
        t = q.shape[1]
        w0 = None
        if pages is None:
            k = self.prefill_topk if t > 1 else (0 if self.keep_selection else state.topk)
            if k:
                pages = self._select_layer(state, layer, q, lkv, lkv.n - t, rope, k)
        elif t == 1 and not self.keep_selection:
            pages = self._select_layer(state, layer, q, lkv, lkv.n - 1, rope, state.topk)
        elif state.anchor is not None and lkv.n - state.anchor <= state.max_local:
            w0 = state.anchor  # the window grows from where the pages were chosen: no page falls between
            if state.prefix is not None:
                _, pv, ppos = state.prefix[layer]
                keys = self.seen_prefix(state, layer, lkv.n, int(q_pos[-1]), rope)
                return attend_pages(q, lkv, q_pos, rope, sinks, self.window, pages, w0, (keys, pv, ppos))
        return attend_pages(q, lkv, q_pos, rope, sinks, self.window, pages, w0)

    def seen_prefix(self, state: BlockTopKState, layer: int, n: int, last: int, rope: Rotary) -> torch.Tensor:
        """The re-encoded prefix's keys of ``layer`` (rotated at 0..P-1) rotated to where the window's queries
        see them: the P positions just before the window ``state.anchor .. n`` whose newest token is at
        ``last``. The shift stays the same while the answer grows (``last`` and ``n`` advance together),
        so the rotated keys are kept per layer and rotated again only when it changes."""
        assert state.prefix is not None and state.anchor is not None
        pk = state.prefix[layer][0]
        shift = last - (pk.shape[1] + n - state.anchor) + 1  # 0..P-1 -> the positions assigned to them
        kept = state.seen.get(layer)
        if kept is None or kept[0] is not pk or kept[1] != shift:
            kept = (pk, shift, rope.rotate(pk, torch.full((pk.shape[1],), shift, dtype=torch.int64, device=pk.device)))
            state.seen[layer] = kept
        return kept[2]

    def reads_in_place(self, state: BlockTopKState, layer: int, lkv: LayerKV) -> bool:
        """A dense read, or a kept selection whose window has room, over the re-encoded prefix (see :meth:`attend`)."""
        n = lkv.n + 1  # with the next token
        if state.dense and n <= state.max_position:
            return True
        pages = state.pages[layer]
        return (self.keep_selection and state.prefix is not None and pages is not None and pages.numel() > 0
                and state.anchor is not None and n - state.anchor <= state.max_local)  # fmt: skip

    def in_place_parts(
        self, state: BlockTopKState, layer: int, lkv: LayerKV, rope: Rotary, position: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Dense: every cached token. A kept selection: the re-encoded prefix where the window sees it, then
        the window from ``state.anchor`` (see :meth:`attend`)."""
        if state.dense and lkv.n <= state.max_position:
            return [], 0
        assert state.prefix is not None and state.anchor is not None
        return [(self.seen_prefix(state, layer, lkv.n, position, rope), state.prefix[layer][1])], state.anchor

    def _scores(
        self, state: BlockTopKState, layer: int, q: torch.Tensor, lkv: LayerKV, n_before: int, rope: Rotary
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate pages (C,) and their rating (Hkv, R, C) per row (one per query of each KV head's group):
        the share of attention (``aggregate="mass"``) or the z-score over the pages (``"z"``)."""
        ps = lkv.page_size
        sinks = self.sink_tokens(ps)
        cand = candidate_pages(n_before, sinks, self.window, ps, q.device)
        if self.score not in ("max", "lse"):
            state.summaries[layer].update(lkv, rope)
        w0 = window_start(n_before, sinks, self.window, ps)
        s = page_scores(q, lkv, cand, w0 - ps, rope, self.score, state.summaries[layer])
        if self.aggregate == "z":
            return cand, zscore(s)
        scale = 1.0 if self.score == "lse" else q.shape[-1] ** -0.5
        return cand, torch.softmax(s * scale, dim=-1)

    def _select_layer(
        self, state: BlockTopKState, layer: int, q: torch.Tensor, lkv: LayerKV, n_before: int, rope: Rotary, k: int
    ) -> torch.Tensor | None:
        cand, z = self._scores(state, layer, q, lkv, n_before, rope)
        if cand.numel() == 0:
            return None
        return top_pages(cand, vote(z, self.votes) if self.scope == "head" else vote(z.flatten(0, 1)[None], self.votes), k)

    # ------------------------------------------------------------------ selection at the question
    def select(
        self, state: BlockTopKState, model: ModelConfig, cache: KVCache, context: list[int], ids: list[int], ropes: Sequence[Rotary]
    ) -> SelectPlan:
        """Choose the pages for the question ``ids``, which follows the cached ``context`` tokens.

        Needs (see :class:`~longkv.policies.base.SelectionPolicy`): the question's
        queries in every layer, read against sinks + window (:class:`ProbeQueries`);
        with ``verify``, the confidence of the answer read from each of the best
        pages alone (:class:`GreedyConfidence`); with ``reencode``, the sink pages +
        selected pages encoded as one short text (:class:`EncodeText`). Scores every
        candidate page and stores the selection in ``state``. The cache is left as it was.
        """
        shaped = [i for i in range(model.n_layers) if not model.attn(i).sliding]  # sliding layers read their window
        g0 = cache[shaped[0]] if shaped else cache[0]
        n0 = g0.n
        ps = g0.page_size
        sinks = self.sink_tokens(ps)
        cand = candidate_pages(n0, sinks, self.window, ps, g0.device)
        state.candidates, state.z, state.score, state.prefix, state.seen = cand, None, None, None, {}
        state.first_score = state.confidence = None
        topk = self.k(model)
        if cand.numel() == 0 or topk == 0 or not shaped:
            self.reset(state)
            return

        def local(layer: int, q: torch.Tensor, lkv: LayerKV, pos: torch.Tensor) -> torch.Tensor:
            return attend_pages(q, lkv, pos, ropes[layer], sinks, self.window, None)

        queries: list[torch.Tensor] = yield ProbeQueries(list(ids), local)
        if 0 < state.question_tokens < len(ids):  # the question's own queries: not the text before it
            queries = [q[:, -state.question_tokens :] for q in queries]
        best: torch.Tensor | None = None  # (<= votes, C): the best z-scores of every page so far
        heads = resolve_heads(self.heads, model) if self.scope == "shared" else None
        by_heads = torch.zeros(cand.numel(), device=cand.device)  # (C,): sum over the retrieval heads of their rating
        per_head = []
        for i, q in enumerate(queries):
            if model.attn(i).sliding:
                continue
            if heads:  # only the layers that hold a retrieval head are scored (and, when tiered, read)
                here = [h for layer, h in heads if layer == i]
                if here:
                    z = self._scores(state, i, q, cache[i], n0, ropes[i])[1]  # (Hkv, G * T, C), head-major per group
                    r = z.reshape(q.shape[0], q.shape[1], -1)[here].mean(1)  # (n, C): mean over the queries
                    by_heads += (r.clamp_min(1e-6).log() if self.aggregate == "mass" else r).sum(0)
                continue
            z = self._scores(state, i, q, cache[i], n0, ropes[i])[1]  # (Hkv, R, C)
            per_head.append(vote(z, self.votes))
            if self.scope == "shared":
                best = merge_votes(best, z.flatten(0, 1), self.votes)
            elif self.scope == "layer":
                state.pages[i] = top_pages(cand, vote(z.flatten(0, 1)[None], self.votes), topk, self.expand)
            else:
                state.pages[i] = top_pages(cand, per_head[-1], topk)
        state.z = torch.stack(per_head) if per_head else None  # (L, Hkv, C); None with retrieval heads
        state.anchor = window_start(n0, sinks, self.window, ps)
        if heads:
            state.score = by_heads / len(heads)
        elif best is not None:
            state.score = best.mean(0)
        if state.score is None:
            return
        state.first_score = state.score
        if self.verify and cand.numel() > topk:
            m = min(self.verify, cand.numel())
            order = torch.topk(state.first_score, m).indices  # best first
            texts = [[context[i] for i in self._page_text(cand, c, sinks, ps).tolist()] + list(ids) for c in order.tolist()]
            conf = torch.tensor((yield GreedyConfidence(texts, self.verify_tokens)), dtype=torch.float32, device=cand.device)
            first = state.first_score  # verified pages rank by confidence, above every other page (same order)
            state.score = first - first.max() + conf.min() - 1.0
            state.score[order] = conf
            state.confidence = conf
        shared = top_pages(cand, state.score[None], topk if self.verify else self.close_pages(state.score, topk, bool(heads)), self.expand)
        state.pages = [shared] * len(queries)
        if self.reencode:
            dev = shared.device
            idx = torch.cat((torch.arange(sinks, device=dev), (shared[0][:, None] * ps + torch.arange(ps, device=dev)).flatten()))
            kv = yield EncodeText([context[i] for i in idx.tolist()])
            state.prefix = [(k, v, idx) for k, v in kv]

    def close_pages(self, score: torch.Tensor, topk: int, log_units: bool) -> int:
        """How many pages to read: ``topk``, plus the further pages whose ``score`` (C,) is within
        ``margin`` of the best (natural-log units; vote shares are compared by their log), up to ``topk_max``."""
        if self.margin <= 0 or topk == 0 or score.numel() <= topk:
            return topk
        s = score if log_units else score.clamp_min(1e-9).log()
        close = int((s >= s.max() - self.margin).sum())
        return max(topk, min(close, self.topk_max))

    def _page_text(self, cand: torch.Tensor, c: int, sinks: int, ps: int) -> torch.Tensor:
        """Token indices (T,) of the sink pages + candidate ``c`` and its ``expand`` neighbours."""
        dev = cand.device
        near = torch.arange(c - self.expand, c + self.expand + 1, device=dev)
        pages = cand[near[(near >= 0) & (near < cand.numel())]]
        return torch.cat((torch.arange(sinks, device=dev), (pages[:, None] * ps + torch.arange(ps, device=dev)).flatten()))
