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
from itertools import accumulate
from typing import Any

import torch

from longkv.attention.dense import attend
from longkv.config import EngineConfig
from longkv.kv.cache import HeadwiseLayerKV, KVCache, LayerKV
from longkv.models.llama import LlamaModel
from longkv.policies.base import KVPolicy, SelectionPolicy, probe_observation

# progress(tokens_done, tokens_total)
ProgressFn = Callable[[int, int], None]


@dataclass
class Sequence:
    """One sequence's state: its KV cache and every token fed so far (position = index)."""

    cache: KVCache
    tokens: list[int] = field(default_factory=list)
    peak_kv_bytes: int = 0
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, W, D) last queries
    # question-aware compression (see longkv.policies.modes): after every prefill chunk these
    # tokens (the question) are probed over the cache and their queries score what to keep
    probe_ids: list[int] = field(default_factory=list)
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

    def _compress(self, seq: Sequence, chunk: list[int] | None = None) -> None:
        """Let the policy free what it will in every layer.

        Observation queries: for policies that score by reconstruction
        (``reconstruct``, KVzip), a repeat of the prefill ``chunk`` probed over
        the cache, in both modes; else the question's, probed the same way, when
        ``seq.probe_ids`` is set (question-aware); else the last
        ``query_window`` queries.
        """
        probe: dict[int, torch.Tensor] = {}
        if chunk and getattr(self.policy, "reconstruct", False):
            probe = self.probe(seq, chunk)
        elif seq.probe_ids:
            probe = self.probe(seq, seq.probe_ids)
        with probe_observation(bool(probe)):
            self.policy.compress_layers(seq.cache.layers, probe or seq.queries)

    @torch.inference_mode()
    def probe(self, seq: Sequence, ids: list[int]) -> dict[int, torch.Tensor]:
        """Queries of ``ids`` fed after every cached token, their KV not stored: layer -> (H, P, D).

        The probe tokens take the positions that follow the sequence and attend
        to the cache (as the policy positions it) and causally to themselves; the
        cache and ``seq.tokens`` are left untouched. Used to score cached tokens
        by what a later text needs from them: the question (FINCH, Corallo &
        Papotti 2024) or a repeat of the context (KVzip, Kim et al. 2025).
        Cost: one forward of ``len(ids)`` tokens over the cache.
        """
        out: dict[int, torch.Tensor] = {}

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            out[layer] = q
            lkv = seq.cache[layer]
            heads = lkv.heads if isinstance(lkv, HeadwiseLayerKV) else [lkv]
            g = q.shape[0] // len(heads)
            hk = k.shape[0] // len(heads)
            outs = []
            for h, head in enumerate(heads):
                keys, values, kpos = head.view()
                keys = self._move_keys(keys, kpos)
                kk, vv = k[h * hk : (h + 1) * hk], v[h * hk : (h + 1) * hk]
                outs.append(attend(q[h * g : (h + 1) * g], torch.cat((keys, kk), 1), torch.cat((values, vv), 1), pos, torch.cat((kpos, pos))))
            return torch.cat(outs, dim=0)

        p0 = seq.next_position
        positions = torch.arange(p0, p0 + len(ids), dtype=torch.int64)
        self.model.forward(torch.tensor(ids, dtype=torch.int64), positions, attention, "none")
        return out

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
                answer_logits = self.ask(seq, ids[split:])
                if progress is not None:
                    progress(len(ids), len(ids))
                return answer_logits
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
                self._compress(seq, part)
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
        self._after_decode(seq, token)
        return out[-1]

    def _after_decode(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        budget = self.policy.budget_tokens
        if budget is not None and seq.cache[0].n >= budget + self.policy.evict_every:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
            self._compress(seq)
        elif budget is None and len(seq.tokens) % 64 == 0:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())

    # ------------------------------------------------------------------ batches
    def _batch_attention(
        self, seqs: list[Sequence], sizes: list[int]
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Attention over a ragged batch: the T tokens are ``sizes[i]`` tokens of ``seqs[i]`` in turn."""
        fns = [self._attention(s) for s in seqs]

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            outs, o = [], 0
            for fn, n in zip(fns, sizes, strict=True):
                outs.append(fn(layer, q[:, o : o + n], k[:, o : o + n], v[:, o : o + n], pos[o : o + n]))
                o += n
            return torch.cat(outs, dim=1)

        return attention

    @torch.inference_mode()
    def prefill_batch(
        self, seqs: list[Sequence], prompts: list[list[int]], progress: ProgressFn | None = None, compress: bool = True
    ) -> list[torch.Tensor]:
        """Prefill several sequences at once; return the logits (V,) after each prompt.

        A ragged batch (prompts of any lengths, no padding): each step takes the
        next ``chunk_size`` tokens of every unfinished prompt, runs the model
        once over all of them (one matmul per weight for the whole batch) and
        attention sequence by sequence over its own cache; then each sequence
        is compressed under the policy as :meth:`prefill` would. Every
        sequence ends exactly as if prefilled alone (same kept tokens, logits
        equal up to float rounding). Selection policies (block_topk) choose
        pages from each question separately: their sequences are prefilled
        one after the other.

        Raises:
            ValueError: an empty prompt, or ``seqs`` and ``prompts`` of different lengths.
        """
        if len(seqs) != len(prompts) or any(not p for p in prompts):
            raise ValueError("prefill_batch needs one non-empty prompt per sequence")
        if isinstance(self.policy, SelectionPolicy) or len(seqs) == 1:
            return [self.prefill(s, p, progress, compress) for s, p in zip(seqs, prompts, strict=True)]
        chunk, total = self.engine.chunk_size, sum(map(len, prompts))
        logits: list[torch.Tensor | None] = [None] * len(seqs)
        done = 0
        for start in range(0, max(map(len, prompts)), chunk):
            active = [i for i, p in enumerate(prompts) if start < len(p)]
            parts = [prompts[i][start : start + chunk] for i in active]
            positions = torch.cat([torch.arange(seqs[i].next_position, seqs[i].next_position + len(part)) for i, part in zip(active, parts, strict=True)])
            ends = torch.tensor(list(accumulate(map(len, parts)))) - 1
            last = [j for j, i in enumerate(active) if start + chunk >= len(prompts[i])]
            ids = torch.tensor([t for part in parts for t in part], dtype=torch.int64)
            out = self.model.forward(ids, positions, self._batch_attention([seqs[i] for i in active], list(map(len, parts))), ends[last] if last else "none")
            for j, (i, part) in enumerate(zip(active, parts, strict=True)):
                seq = seqs[i]
                seq.tokens.extend(part)
                seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
                if compress and self.policy.budget_tokens is not None:
                    self._compress(seq, part)
                if j in last:
                    assert out is not None
                    logits[i] = out[last.index(j)]
            done += len(ids)
            if progress is not None:
                progress(done, total)
        return [lg for lg in logits if lg is not None]

    @torch.inference_mode()
    def decode_batch(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each sequence in one forward; return the logits (B, V).

        Raises:
            ValueError: ``seqs`` and ``tokens`` of different lengths.
        """
        if len(seqs) != len(tokens):
            raise ValueError("decode_batch needs one token per sequence")
        pos = torch.tensor([s.next_position for s in seqs], dtype=torch.int64)
        out = self.model.forward(torch.tensor(tokens, dtype=torch.int64), pos, self._batch_attention(seqs, [1] * len(seqs)), "all")
        assert out is not None
        for seq, token in zip(seqs, tokens, strict=True):
            self._after_decode(seq, token)
        return out

    @torch.inference_mode()
    def logits_all(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) at every position of ``ids`` in one forward (perplexity, parity tests)."""
        p0 = seq.next_position
        positions = torch.arange(p0, p0 + len(ids), dtype=torch.int64)
        out = self.model.forward(torch.tensor(ids, dtype=torch.int64), positions, self._attention(seq), "all")
        assert out is not None
        seq.tokens.extend(ids)
        return out
