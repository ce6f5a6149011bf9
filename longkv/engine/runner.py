"""The loop: chunked prefill and one-token decode steps over a paged KV cache.

A :class:`Sequence` is one stream of tokens with its own cache; the
:class:`Runner` feeds it tokens. It asks the policy at fixed points: which
position each cached key has (before every attention) and what to free (after
every prefill chunk, and every ``evict_every`` decode steps), so resident KV
never exceeds ``budget + max(chunk_size, evict_every)`` tokens per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from longkv.attention.dense import attend
from longkv.config import EngineConfig
from longkv.kv.cache import HeadwiseLayerKV, KVCache, LayerKV
from longkv.models.llama import LlamaModel
from longkv.policies.base import KVPolicy, SelectionPolicy

# progress(tokens_done, tokens_total)
ProgressFn = Callable[[int, int], None]


@dataclass
class Sequence:
    """One sequence's state: its KV cache and every token fed so far (position = index)."""

    cache: KVCache
    tokens: list[int] = field(default_factory=list)
    peak_kv_bytes: int = 0
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, W, D) last queries
    # layer -> (H, W, D) fixed observation window that compression scores with instead of
    # the last queries (question-aware compression of a context, see longkv.policies.modes)
    observation: dict[int, torch.Tensor] = field(default_factory=dict)
    selection: Any = None  # a SelectionPolicy's state (selected pages, page summaries)

    @property
    def next_position(self) -> int:
        return len(self.tokens)


class Runner:
    """Runs a model over sequences under one KV policy.

    Args:
        model: a model from :func:`longkv.models.build`.
        policy: the KV policy.
        engine: chunk size, page size.
    """

    query_window = 32  # queries kept per layer for policies that score with them

    def __init__(self, model: LlamaModel, policy: KVPolicy, engine: EngineConfig) -> None:
        self.model = model
        self.policy = policy
        self.engine = engine

    def new_sequence(self, expected_tokens: int = 0) -> Sequence:
        """A fresh sequence; reserves KV room for ``expected_tokens`` (or the policy's bound)."""
        c = self.model.config
        make: Callable[[], LayerKV] = partial(self.policy.new_layer_kv, c.n_kv_heads, c.head_dim, self.engine.page_size, self.model.dtype)
        if isinstance(self.policy, SelectionPolicy):  # may build tiered stores sized from the model
            make = partial(self.policy.new_layer_kv, c.n_kv_heads, c.head_dim, self.engine.page_size, self.model.dtype, c, self.engine)
        if getattr(self.policy, "per_head", False):  # heads keep different tokens (AdaKV)
            one = partial(self.policy.new_layer_kv, 1, c.head_dim, self.engine.page_size, self.model.dtype)
            make = partial(HeadwiseLayerKV, one, c.n_kv_heads)
        cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, self.engine.page_size, self.model.dtype, make)
        budget = self.policy.budget_tokens
        bound = budget + max(self.engine.chunk_size, self.policy.evict_every) if budget is not None else None
        reserve = min(expected_tokens, bound) if bound is not None else expected_tokens
        layer_budget = getattr(self.policy, "layer_budget", None)
        if reserve and budget is not None and layer_budget is not None:  # per-layer budgets (PyramidKV)
            extra = max(self.engine.chunk_size, self.policy.evict_every)
            for i, lkv in enumerate(cache.layers):
                lkv.reserve(min(expected_tokens, layer_budget(i) + extra))
        elif reserve:
            cache.reserve(reserve)
        seq = Sequence(cache)
        if isinstance(self.policy, SelectionPolicy):
            seq.selection = self.policy.new_state(c, self.engine)
        return seq

    def _attention(self, seq: Sequence) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        policy, rope = self.policy, self.model.rope
        keep_queries = policy.needs_queries
        if isinstance(policy, SelectionPolicy):
            selective = policy

            def selective_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                lkv = seq.cache[layer]
                lkv.append(k, v, pos)
                return selective.attend(seq.selection, layer, q, lkv, pos, rope)

            return selective_attention

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            lkv = seq.cache[layer]
            if isinstance(lkv, HeadwiseLayerKV):
                return self._attend_headwise(seq, layer, lkv, q, k, v, pos)
            lkv.append(k, v, pos)
            keys, values, kpos = lkv.view()
            keys = self._move_keys(keys, kpos)
            if keep_queries:
                prev = seq.queries.get(layer)
                qs = q if prev is None else torch.cat((prev, q), dim=1)
                seq.queries[layer] = qs[:, -self.query_window :]
            return attend(q, keys, values, pos, kpos)

        return attention

    def _move_keys(self, keys: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Keys (Hkv, N, D) as seen at the policy's positions for them (see ``KVPolicy.key_positions``).

        Keys are cached rotated at their original position; only those that move are
        rotated, by the delta (a prefix: deltas are non-increasing and end at 0).
        """
        target = self.policy.key_positions(kpos)
        if target is None:
            return keys
        delta = target - kpos
        moved = int(torch.count_nonzero(delta))
        if not moved:
            return keys
        return torch.cat((self.model.rope.rotate(keys[:, :moved], delta[:moved]), keys[:, moved:]), dim=1)

    def _attend_headwise(
        self, seq: Sequence, layer: int, lkv: HeadwiseLayerKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        # Each KV head holds its own tokens: attend group by group (q heads h*G .. h*G+G-1 share KV head h).
        lkv.append(k, v, pos)
        if self.policy.needs_queries:
            prev = seq.queries.get(layer)
            qs = q if prev is None else torch.cat((prev, q), dim=1)
            seq.queries[layer] = qs[:, -self.query_window :]
        g = q.shape[0] // len(lkv.heads)
        outs = []
        for h, head in enumerate(lkv.heads):
            keys, values, kpos = head.view()
            keys = self._move_keys(keys, kpos)
            outs.append(attend(q[h * g : (h + 1) * g], keys, values, pos, kpos))
        return torch.cat(outs, dim=0)

    def _compress(self, seq: Sequence) -> None:
        for i, lkv in enumerate(seq.cache.layers):
            self.policy.compress(i, lkv, seq.observation.get(i, seq.queries.get(i)))

    @torch.inference_mode()
    def prefill(
        self, seq: Sequence, ids: list[int], progress: ProgressFn | None = None, compress: bool = True
    ) -> torch.Tensor:
        """Feed ``ids`` in chunks of ``engine.chunk_size``; return the logits (V,) after the last one.

        Logits are computed for the last position only (the LM head is skipped
        for every other chunk). ``compress=False`` skips compression (a short
        question after a compressed context: the cache grows by ``len(ids)``).
        Under a selection policy the question (the last part of ``ids``, see
        ``SelectionPolicy.question_start``) goes last, after the policy has chosen
        its pages from it. Raises ValueError on empty ``ids``.
        """
        if not ids:
            raise ValueError("prefill needs at least one token")
        if isinstance(self.policy, SelectionPolicy):
            self.policy.reset(seq.selection, len(ids))
            split = self.policy.question_start(len(ids), seq.selection)
            if split:
                self._chunks(seq, ids[:split], progress, 0, len(ids), compress)
                return self.ask(seq, ids[split:])
        logits = self._chunks(seq, ids, progress, 0, len(ids), compress)
        assert logits is not None
        return logits

    @torch.inference_mode()
    def ask(self, seq: Sequence, question: list[int]) -> torch.Tensor:
        """Selection policies: choose pages from ``question``'s queries, then feed it; logits (V,).

        Also lets several questions be asked about one prefilled context (cut the
        cache back with ``LayerKV.truncate`` and ``seq.tokens`` between them).
        """
        assert isinstance(self.policy, SelectionPolicy) and question
        self.policy.select(seq.selection, self.model, seq.cache, seq.tokens, question)
        logits = self._chunks(seq, question, None, 0, len(question))
        assert logits is not None
        return logits

    def _chunks(
        self, seq: Sequence, ids: list[int], progress: ProgressFn | None, done: int, total: int, compress: bool = True
    ) -> torch.Tensor | None:
        attention = self._attention(seq)
        chunk = self.engine.chunk_size
        logits: torch.Tensor | None = None
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            is_last = start + chunk >= len(ids)
            p0 = seq.next_position
            positions = torch.arange(p0, p0 + len(part), dtype=torch.int64)
            out = self.model.forward(
                torch.tensor(part, dtype=torch.int64), positions, attention, "last" if is_last else "none"
            )
            seq.tokens.extend(part)
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
            if compress and self.policy.budget_tokens is not None:
                self._compress(seq)
            if progress is not None:
                progress(done + start + len(part), total)
            if out is not None:
                logits = out[-1]
        return logits

    @torch.inference_mode()
    def decode(self, seq: Sequence, token: int) -> torch.Tensor:
        """Feed one token; return the logits (V,) for the next one."""
        pos = torch.tensor([seq.next_position], dtype=torch.int64)
        out = self.model.forward(torch.tensor([token], dtype=torch.int64), pos, self._attention(seq), "last")
        assert out is not None
        seq.tokens.append(token)
        budget = self.policy.budget_tokens
        if budget is not None and seq.cache[0].n >= budget + self.policy.evict_every:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
            self._compress(seq)
        elif budget is None and len(seq.tokens) % 64 == 0:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
        return out[-1]

    @torch.inference_mode()
    def logits_all(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) at every position of ``ids`` in one forward (perplexity, parity tests)."""
        p0 = seq.next_position
        positions = torch.arange(p0, p0 + len(ids), dtype=torch.int64)
        out = self.model.forward(torch.tensor(ids, dtype=torch.int64), positions, self._attention(seq), "all")
        assert out is not None
        seq.tokens.extend(ids)
        return out
