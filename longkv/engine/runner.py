"""Model runner: feeds tokens to sequences through the model, under each sequence's KV policy.

A :class:`Sequence` is one stream of tokens with its own cache; a :class:`Runner`
feeds it tokens under one policy, as :class:`~longkv.engine.step.Work` items that
:func:`~longkv.engine.step.run_batch` runs in one forward with other sequences'
(prompt chunks and decode tokens mixed, policies mixed). The runner asks the policy at fixed points: which position each cached
key has (before every attention) and what to free (after every prefill chunk,
and every ``evict_every`` decode steps), so resident KV never exceeds
``budget + max(chunk_size, evict_every)`` tokens per layer.

Scheduling (which sequences share a forward, sampling, stop rules) lives one
level up, in the step loop of :mod:`longkv.engine.engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from longkv import kernels
from longkv.attention.dense import attend, attend_segments, in_window
from longkv.config import EngineConfig
from longkv.engine.needs import NeedRun
from longkv.engine.step import AttentionFn, Work, run_batch
from longkv.kv.cache import KVCache, LayerKV, page_format
from longkv.kv.headwise import HeadwiseLayerKV
from longkv.kv.pool import KVPools, PagePool
from longkv.kv.quant import Part, SeenAt, drop_front
from longkv.models.layers import SequenceRotary
from longkv.models.llama import LlamaModel
from longkv.policies.base import KVPolicy, Observation, SelectionPolicy, SelectionState, SelectPlan

# progress(tokens_done, tokens_total)
ProgressFn = Callable[[int, int], None]
# a part of a layer's cache as attention reads it: keys (rotated for their positions), values (Hkv, N, D), original positions (N,)
Segment = Part  # k, v (Hkv, n, D) or int8 CodedRows, positions (n,)
# (layer, q (H, T, D), k, v (Hkv, T, D), positions (T,)) -> the parts attention reads, new keys appended (Runner.reader)
ReadFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[Segment]]


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
    # a compression waiting for its probe: these tokens' queries, fed after the cache, score
    # what is kept; the probe is the sequence's next work (Runner.due_work)
    probe_due: list[int] | None = None
    selection: SelectionState | None = None  # a selection policy's state (selected pages, page summaries)

    @property
    def next_position(self) -> int:
        return len(self.tokens)


class Runner:
    """Runs a model over sequences under one KV policy.

    Args:
        model: a model from :func:`longkv.models.build`.
        policy: the KV policy.
        engine: chunk size, page size.
        pools: the engine's page pools the sequences take their pages from (by
            default every layer of every sequence has a pool of its own).
    """

    query_window = 32  # queries kept per layer for policies that score with them

    def __init__(self, model: LlamaModel, policy: KVPolicy, engine: EngineConfig, pools: KVPools | None = None) -> None:
        self.model = model
        self.policy = policy
        self.engine = engine
        self.pools = pools
        # this runner's own table memos (the model's ropes are stateless), one per distinct layer RoPE
        memos: dict[int, SequenceRotary] = {}
        self.ropes = tuple(memos.setdefault(id(r), SequenceRotary(r)) for r in model.ropes)
        self.windows = [spec.window for spec in model.config.layers]  # sliding layers' windows (None: global)
        # The user's policy shapes the global layers only; a sliding layer keeps a ring of its window.
        self.global_layers = [i for i, w in enumerate(self.windows) if w is None]
        self.sliding_layers = [i for i, w in enumerate(self.windows) if w is not None]

    def new_sequence(self, expected_tokens: int = 0) -> Sequence:
        """A fresh sequence; reserves KV room for ``expected_tokens`` (or the policy's bound)."""
        c, pol, ps, dt = self.model.config, self.policy, self.engine.page_size, self.model.dtype
        pools = self.pools
        fmt = pol.page_format(c.head_dim, dt)
        per_head = pol.per_head  # heads keep different tokens (AdaKV)
        heads = 1 if per_head else c.n_kv_heads

        def store(i: int) -> LayerKV:
            pool = pools.get(i, heads, fmt) if pools is not None else PagePool(heads, fmt, ps, self.model.device)
            return pol.new_layer_kv(heads, c.head_dim, ps, dt, c, self.engine, pool)

        def ring(i: int) -> LayerKV:  # a sliding layer: plain pages, whatever the policy's format or tiers
            plain = page_format(c.head_dim, dt)
            pool = pools.get(i, c.n_kv_heads, plain) if pools is not None else PagePool(c.n_kv_heads, plain, ps, self.model.device)
            return LayerKV(c.n_kv_heads, c.head_dim, ps, dt, pool=pool)

        def make(i: int) -> LayerKV:
            if self.windows[i] is not None:
                return ring(i)
            return HeadwiseLayerKV(partial(store, i), c.n_kv_heads) if per_head else store(i)

        cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, ps, dt, make)
        if expected_tokens:
            for i, lkv in enumerate(cache.layers):
                lkv.reserve(self._layer_room(i, expected_tokens))
        seq = Sequence(cache)
        if isinstance(self.policy, SelectionPolicy):
            seq.selection = self.policy.new_state(c, self.engine)
        return seq

    def _layer_room(self, layer: int, expected_tokens: int) -> int:
        """Tokens layer ``layer`` reserves for a sequence of ``expected_tokens``: what it will hold at most, its
        budget (or window) + one chunk."""
        w, pol = self.windows[layer], self.policy
        budget = pol.layer_budget(layer) if w is None else w + self.engine.page_size
        return expected_tokens if budget is None else min(expected_tokens, budget + max(self.engine.chunk_size, pol.evict_every))

    def reservation(self, expected_tokens: int) -> int | None:
        """KV bytes :meth:`new_sequence` reserves for ``expected_tokens`` (whole pages per layer), computed without
        taking any; a sequence that attaches cached prefix pages reserves this or up to a page per layer more.
        None where the store's resident bytes are not its pages (a tiered store)."""
        c, pol, ps, dt = self.model.config, self.policy, self.engine.page_size, self.model.dtype
        if not pol.pages_in_ram():
            return None
        fmt, plain = pol.page_format(c.head_dim, dt), page_format(c.head_dim, dt)
        slot = fmt.bytes_per_slot(1) * c.n_kv_heads if pol.per_head else fmt.bytes_per_slot(c.n_kv_heads)
        total = 0
        for i, w in enumerate(self.windows):
            pages = -(-self._layer_room(i, expected_tokens) // ps)
            total += pages * ps * (plain.bytes_per_slot(c.n_kv_heads) if w is not None else slot)
        return total

    def attention(self, seq: Sequence) -> AttentionFn:
        """``seq``'s attention in every layer under the policy: appends the new keys (T of them), reads
        what the policy keeps, returns the output (H, T, D); a sliding layer reads its window."""
        policy, ropes, windows = self.policy, self.ropes, self.windows
        read = self._read_fn(seq)
        selective = policy if isinstance(policy, SelectionPolicy) else None
        per_head = policy.per_head

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            if windows[layer] is not None:  # a sliding layer reads its window, whatever the policy
                return attend_segments(q, read(layer, q, k, v, pos), pos, windows[layer])
            lkv = seq.cache[layer]
            if selective is not None:
                lkv.append(k, v, pos)
                return selective.attend(seq.selection, layer, q, lkv, pos, ropes[layer])
            if per_head:  # per-head stores (AdaKV)
                assert isinstance(lkv, HeadwiseLayerKV)
                return self._attend_headwise(seq, layer, lkv, q, k, v, pos)
            return attend_segments(q, read(layer, q, k, v, pos), pos)

        return attention

    def reader(self, seq: Sequence) -> ReadFn | None:
        """What one decode token of ``seq`` reads in each layer, as a read plan its caller attends over;
        ``None`` when its policy attends on its own (a selection policy, per-head stores).

        The returned function appends the new key and value to the layer's cache (and
        keeps the last queries for policies that score with them) and returns the parts
        of the cache the token sees, in order: read in place (a shared prefix's pages,
        then the sequence's own) when no key moves, else one joined part with the keys
        moved to the policy's positions for them; in a sliding layer, only the keys
        inside its window. The step loop attends over the plans of every decoding
        sequence of a batch at once (:func:`~longkv.attention.dense.attend_decode_batch`).
        """
        if self.policy.per_head or isinstance(self.policy, SelectionPolicy):
            return None
        read, windows = self._read_fn(seq), self.windows

        def decode_read(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
            return in_window(read(layer, q, k, v, pos), pos, windows[layer])

        return decode_read

    def _read_fn(self, seq: Sequence) -> ReadFn:
        """Append the new keys to a layer with a plain store and return its cache's parts (see :meth:`reader`),
        every key seen whole (a sliding window is the caller's to apply). A sliding layer
        is not the policy's: no key of it moves and no query of it is kept."""
        policy, windows = self.policy, self.windows
        keep_queries, moves = policy.needs_queries, policy.moves_keys

        def read(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
            lkv = seq.cache[layer]
            lkv.append(k, v, pos)
            mine = windows[layer] is None
            if keep_queries and mine:
                self.keep_queries(seq, layer, q)
            segments: list[Segment] = [*lkv.decode_parts()]  # int8 pages stay codes: the decode kernel reads them so
            if not mine:
                return segments
            if moves and q.shape[1] == 1 and self._turns_queries(q, segments):
                # a decode step's kernel reads the keys in place and turns the query per run of one shift; the
                # policy renumbers them (KVPolicy.key_positions): the i-th is seen at the new one's - (n - 1) + i
                at, seen = int(pos[-1]) - (lkv.n - 1), list[Segment]()
                for sk, sv, sp in segments:
                    assert not isinstance(sk, SeenAt)
                    seen.append((SeenAt(sk, sp, at, self.ropes[layer]), sv, sp))
                    at += sp.shape[0]
                return seen
            kpos = segments[0][2] if len(segments) == 1 else lkv.positions()
            target = policy.key_positions(kpos)
            if target is None:
                return segments  # no key moves: a shared prefix's pages, then the own, read in place
            # the keys that move are a prefix (StreamingLLM: its sinks): only those are read out and rotated,
            # the rest stays in place (int8 pages as codes)
            delta = target - kpos
            moved = int(torch.count_nonzero(delta))
            keys, values, _ = lkv.read(0, moved)
            assert values is not None
            rotated = self.ropes[layer].rotate(keys, delta[:moved])
            return [(rotated, values, kpos[:moved]), *drop_front(segments, moved)]

        return read

    def keep_queries(self, seq: Sequence, layer: int, q: torch.Tensor) -> None:
        """Add the rotated queries q (H, T, D) to the last :attr:`query_window` a policy that scores with
        queries keeps for ``layer`` (``Sequence.queries``)."""
        prev = seq.queries.get(layer)
        qs = q if prev is None else torch.cat((prev, q), dim=1)
        seq.queries[layer] = qs[:, -self.query_window :]

    @staticmethod
    def _turns_queries(q: torch.Tensor, segments: list[Segment]) -> bool:
        """Whether the decode kernel reads these parts where their keys move (it turns the query instead)."""
        return kernels.supports(q, segments[0][0]) and all(p.is_contiguous() for _, _, p in segments)

    def _move_keys(self, layer: int, keys: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Keys (Hkv, N, D) as seen at the policy's positions for them (see ``KVPolicy.key_positions``).

        Keys are cached rotated at their original position; only those that move are
        rotated, by the delta (a prefix: deltas are non-increasing and end at 0).
        """
        target = self.policy.key_positions(kpos)
        return keys if target is None else self._rotate_to(layer, keys, kpos, target)

    def _rotate_to(self, layer: int, keys: torch.Tensor, kpos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Keys (Hkv, N, D) cached rotated at ``kpos`` (N,), re-rotated to ``target`` (N,) where they differ."""
        delta = target - kpos
        moved = int(torch.count_nonzero(delta))
        if not moved:
            return keys
        return torch.cat((self.ropes[layer].rotate(keys[:, :moved], delta[:moved]), keys[:, moved:]), dim=1)

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
            keys = self._move_keys(layer, keys, kpos)
            outs.append(attend(q[h * g : (h + 1) * g], keys, values, pos, kpos, self.windows[layer]))
        return torch.cat(outs, dim=0)

    def _compress(self, seq: Sequence, chunk: list[int] | None = None) -> None:
        """Let the policy free what it will in every layer (after a prompt ``chunk``, or a decode step).

        Observation queries: after a chunk, for policies that score by
        reconstruction (``reconstruct``, KVzip), a repeat of the chunk probed over
        the cache, in both modes; else the question's, probed the same way, when
        ``seq.probe_ids`` is set (question-aware). A probe is not run here: it
        becomes ``seq.probe_due``, the sequence's next work (:meth:`due_work`),
        batched with the other sequences' tokens, and the policy compresses once
        it has run. Otherwise (and at decode steps) the last ``query_window``
        queries, at once.
        """
        probe_ids = (chunk if self.policy.reconstruct else seq.probe_ids) if chunk else None
        if probe_ids:
            seq.probe_due = list(probe_ids)
            return
        last = seq.next_position - 1
        obs = {layer: Observation.newest(q, last) for layer, q in seq.queries.items()}
        self.policy.compress_layers(self._policy_layers(seq), obs)

    def _policy_layers(self, seq: Sequence) -> dict[int, LayerKV]:
        """The layers the policy shapes (layer index -> cache): the global ones."""
        return {i: seq.cache[i] for i in self.global_layers}

    def due_work(self, seq: Sequence) -> Work | None:
        """The probe ``seq``'s compression waits for (``seq.probe_due``), as a work; ``None`` if none.

        After its forward the policy compresses every layer with the probe's queries
        (positions after every cached token) and ``seq.probe_due`` is cleared. A
        forward cut short leaves it due, to be handed out again.
        """
        ids = seq.probe_due
        if not ids:
            return None

        def compress(queries: dict[int, torch.Tensor]) -> None:
            p0 = seq.next_position  # the probe followed every cached token
            positions = torch.arange(p0, p0 + len(ids), dtype=torch.int64, device=self.model.device)
            seq.probe_due = None
            obs = {layer: Observation(q, positions) for layer, q in queries.items() if self.windows[layer] is None}
            self.policy.compress_layers(self._policy_layers(seq), obs)

        return self.probe_work(seq, ids, compress)

    def probe_work(self, seq: Sequence, ids: list[int], then: Callable[[dict[int, torch.Tensor]], None]) -> Work:
        """A work feeding ``ids`` after every cached token, their KV not stored; ``then`` gets their queries, layer -> (H, P, D).

        The probe tokens take the positions that follow the sequence and attend
        to the cache (as the policy positions it) and causally to themselves; the
        cache and ``seq.tokens`` are left untouched. Used to score cached tokens
        by what a later text needs from them: the question (FINCH, Corallo &
        Papotti 2024) or a repeat of the context (KVzip, Kim et al. 2025).
        Cost: ``len(ids)`` tokens in a batched forward (:func:`run_batch`).
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
                keys = self._move_keys(layer, keys, kpos)
                kk, vv = k[h * hk : (h + 1) * hk], v[h * hk : (h + 1) * hk]
                outs.append(attend(q[h * g : (h + 1) * g], torch.cat((keys, kk), 1), torch.cat((values, vv), 1), pos, torch.cat((kpos, pos)), self.windows[layer]))
            return torch.cat(outs, dim=0)

        return Work(self, seq, list(ids), logits=False, keep=False, attention=attention, then=lambda _: then(out))

    @torch.inference_mode()
    def prefill(
        self, seq: Sequence, ids: list[int], progress: ProgressFn | None = None, compress: bool = True
    ) -> torch.Tensor:
        """Feed ``ids`` in chunks of ``engine.chunk_size``; return the logits (V,) after the last one.

        The same :class:`PrefillPlan` the step loop (``longkv.engine.engine``) runs, one
        sequence alone. Logits are computed for the last position only (the LM head is
        skipped for every other chunk). ``compress=False`` skips compression (a short
        question after a compressed context: the cache grows by ``len(ids)``).
        Under a selection policy the question (the last part of ``ids``, see
        ``SelectionPolicy.question_start``) goes last, after the policy has chosen
        its pages from it. Raises ValueError on empty ``ids``.
        """
        plan = self.plan_prefill(seq, ids, compress)
        logits: torch.Tensor | None = None
        while not plan.done:
            lg = run_batch(self.model, plan.next_works())[-1]
            logits = lg if lg is not None else logits  # a compression probe after the last chunk has none
            if progress is not None:
                progress(plan.fed, plan.total)
        assert logits is not None
        return logits

    def plan_prefill(self, seq: Sequence, ids: list[int], compress: bool = True) -> PrefillPlan:
        """The chunks that prefill ``ids`` into ``seq`` (see :class:`PrefillPlan`). Raises ValueError on empty ``ids``."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        return PrefillPlan(self, seq, list(ids), compress)

    @torch.inference_mode()
    def ask(self, seq: Sequence, question: list[int]) -> torch.Tensor:
        """Selection policies: choose pages from ``question``'s queries, then feed it; logits (V,).

        Also lets several questions be asked about one prefilled context (cut the
        cache back with ``LayerKV.truncate`` and ``seq.tokens`` between them).
        """
        assert isinstance(self.policy, SelectionPolicy) and question
        plan = PrefillPlan(self, seq, list(question), ask=True)
        logits: torch.Tensor | None = None
        while not plan.done:
            lg = run_batch(self.model, plan.next_works())[-1]
            logits = lg if lg is not None else logits
        assert logits is not None
        return logits

    @torch.inference_mode()
    def decode(self, seq: Sequence, token: int) -> torch.Tensor:
        """Feed one token; return the logits (V,) for the next one."""
        out = run_batch(self.model, [Work(self, seq, [token], decode=True)])[0]
        assert out is not None
        return out

    def after_forward(self, work: Work) -> None:
        """Bookkeeping once a forward has fed ``work.ids`` to ``work.seq``: tokens, peak bytes, compression."""
        seq = work.seq
        if not work.keep:
            return
        seq.tokens.extend(work.ids)
        budget = self.policy.budget_tokens if self.global_layers else None
        if not work.decode:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
        self._slide(seq)
        if not work.decode:
            if work.compress and budget is not None:
                self._compress(seq, work.ids)
        elif budget is not None and seq.cache[self.global_layers[0]].n >= budget + self.policy.evict_every:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())
            self._compress(seq)
        elif budget is None and len(seq.tokens) % 64 == 0:
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, seq.cache.bytes())

    def _slide(self, seq: Sequence) -> None:
        """Sliding layers keep a ring of their window: once a page past it has filled, the keys no later
        query can see (position ``<= next - window``) go and their pages back to the pool."""
        ps = self.engine.page_size
        for i in self.sliding_layers:
            lkv, w = seq.cache[i], self.windows[i]
            assert w is not None
            if lkv.n >= w + ps:
                lkv.keep(torch.arange(lkv.n - w, lkv.n, dtype=torch.int64, device=lkv.device))

    @torch.inference_mode()
    def logits_all(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) at every position of ``ids`` in one forward (perplexity, parity tests)."""
        p0 = seq.next_position
        dev = self.model.device
        positions = torch.arange(p0, p0 + len(ids), dtype=torch.int64, device=dev)
        out = self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev), positions, self.attention(seq), "all")
        assert out is not None
        seq.tokens.extend(ids)
        return out



class PrefillPlan:
    """A prompt cut into the chunks that prefill it, handed out step by step.

    Chunks are ``engine.chunk_size`` tokens on the grid of the sequence's positions
    (so a compressing policy sees the same chunks alone or in a batch, and a prompt
    resumed after cached tokens is cut where a run from scratch cuts it). Under a
    selection policy the question part (``SelectionPolicy.question_start``) comes
    last: once the context is in, the policy's ``select`` plan chooses its pages,
    each of its needs handed out as works of their own (:mod:`longkv.engine.needs`)
    before the question's first chunk. After a chunk whose compression scores with
    a probe (the question's queries, or KVzip's re-read of the chunk), that probe is
    the next work and the plan is not done until it has run. The last chunk asks
    for logits.

    Args:
        ask: the whole of ``ids`` is a question about what the sequence holds
            (a selection policy chooses pages from all of it; nothing is reset).
    """

    def __init__(self, runner: Runner, seq: Sequence, ids: list[int], compress: bool = True, ask: bool = False) -> None:
        self.runner, self.seq, self.compress = runner, seq, compress
        self.total = len(ids)
        self.fed = 0  # tokens handed out
        self.question: list[int] = []
        policy = runner.policy
        if isinstance(policy, SelectionPolicy):
            if ask:
                ids, self.question = [], ids
            else:
                policy.reset(seq.selection, len(ids))
                split = policy.question_start(len(ids), seq.selection)
                if split:
                    ids, self.question = ids[:split], ids[split:]
        self._pending = ids
        self._pos = 0
        # the context's chunks end on the grid of the sequence's positions (multiples of chunk_size), also when
        # it resumes after cached tokens: each token is computed in the same chunk as in a run from scratch
        self._base: int | None = len(seq.tokens)
        self._select: SelectPlan | None = None  # the policy's plan at the question, while it runs
        self._need: NeedRun | None = None  # its need in flight

    @property
    def done(self) -> bool:
        """Every chunk and need handed out, and no compression waits for its probe."""
        return self._pos >= len(self._pending) and not self.question and not self.seq.probe_due

    @property
    def remaining(self) -> int:
        """Prompt tokens not handed out yet."""
        return self.total - self.fed

    def _selection(self) -> NeedRun | None:
        """At the question: the selection's need in flight (starting or resuming the policy's
        plan); ``None`` once the pages are chosen (the question's chunks come next)."""
        if self._pos < len(self._pending) or not self.question:
            return None
        while self._need is None or self._need.done:
            policy = self.runner.policy
            assert isinstance(policy, SelectionPolicy)
            try:
                if self._select is None:
                    seq = self.seq
                    self._select = policy.select(seq.selection, self.runner.model.config, seq.cache, seq.tokens, self.question, self.runner.ropes)
                    need = next(self._select)
                else:
                    assert self._need is not None
                    need = self._select.send(self._need.result)
            except StopIteration:
                self._select = self._need = None
                self._pending, self._pos, self.question, self._base = self.question, 0, [], None
                return None
            self._need = NeedRun(self.runner, self.seq, need)
        return self._need

    def peek(self) -> int:
        """Tokens of the next work handed out."""
        if self.seq.probe_due:
            return len(self.seq.probe_due)
        need = self._selection()
        if need is not None:
            return need.peek()
        return self._chunk()

    def _chunk(self) -> int:
        """Tokens of the next chunk: up to the next multiple of chunk_size of the sequence's positions (the
        question of a selection policy: chunk_size), at most what is left."""
        size = self.runner.engine.chunk_size
        if self._base is not None:
            size -= (self._base + self._pos) % size
        return min(size, len(self._pending) - self._pos)

    def next_works(self, budget: int | None = None) -> list[Work]:
        """The next works: the next chunk, or at the question the selection's need (at least
        one work, more while their tokens fit ``budget``; None: no limit). A compression's
        probe (``Sequence.probe_due``) goes first: the next chunk reads the compressed cache."""
        assert not self.done
        due = self.runner.due_work(self.seq)
        if due is not None:
            return [due]
        need = self._selection()
        if need is not None:
            return need.works(budget)
        part = self._pending[self._pos : self._pos + self._chunk()]
        self._pos += len(part)
        self.fed += len(part)
        return [Work(self.runner, self.seq, part, decode=False, logits=self.done, compress=self.compress)]

    def undo(self, work: Work) -> None:
        """Hand ``work`` out again (its forward was cut short and rolled back)."""
        if not work.keep and self.seq.probe_due and work.ids == self.seq.probe_due and (self._need is None or self._need.done):
            return  # the compression's probe: still due
        if self._need is not None and not self._need.done and work.then is not None:
            self._need.undo(work)
            return
        assert work.ids == self._pending[self._pos - len(work.ids) : self._pos]
        self._pos -= len(work.ids)
        self.fed -= len(work.ids)

    def close(self) -> None:
        """Drop what runs at the question (the prompt will not be finished): fresh sequences' pages go back."""
        if self._need is not None:
            self._need.close()
        if self._select is not None:
            self._select.close()
        self._select = self._need = None
