"""The step loop: requests in, token events out, many sequences per forward.

One loop serves every caller (``LLM.generate`` / ``ask`` / ``chat``, batch
generation and the server)::

    engine.add_request(Request(ids, params, policy))
    while engine.has_unfinished():
        for event in engine.step():        # one batched forward
            print(event.text, end="")

Scheduling (as in Orca's iteration-level batching and Sarathi-Serve's
chunked prefills): requests wait in a FIFO queue and join the running batch
between steps while fewer than ``max_num_seqs`` run. Each step feeds every
decoding sequence its last token, then fills the rest of a token budget
(``max_step_tokens``) with prompt chunks, shortest remaining prompt first, so
a short request that arrives during a long prefill gets its first token after
one chunk, not after the whole prompt; the first chunk always goes in, so a
prefill never starves behind decoders. The decode tokens share one forward through
the model (:func:`~longkv.engine.step.run_batch`): a batch reads the weights once; a
prompt chunk runs in a forward of its own.

Each request keeps its own policy, sampler (its own seeded generator: a seed
reproduces a completion whatever else runs), incremental detokenizer and stop
filter, so a sequence's tokens are the same alone or in a batch.

:meth:`Engine.abort` may be called from another thread: the running forward
stops before its next layer, its caches are rolled back, and the request ends
with ``finish_reason="cancelled"`` (the other sequences of that forward redo
the step).

Not thread-safe otherwise: one thread calls ``add_request`` and ``step``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longkv.config import EngineConfig
from longkv.engine.detokenizer import Decoder, Detokenizer, StopFilter
from longkv.engine.grammar import GrammarConstraint
from longkv.engine.runner import PrefillPlan, ProgressFn, Runner, Sequence
from longkv.engine.sampling import SamplingParams, make_generator, sample
from longkv.engine.step import Interrupted, Work, run_batch
from longkv.errors import LongKVError
from longkv.kv.pool import KVPools
from longkv.models.llama import LlamaModel
from longkv.policies.base import KVPolicy

_ids = itertools.count()


@dataclass
class Request:
    """One generation to run.

    Attributes:
        prompt_ids: the whole prompt, token ids.
        params: sampling and stopping.
        policy: the KV policy, validated for this model (``LLM.resolve_policy``).
        question_ids: the question: eviction policies that score with queries probe these
            tokens over the cache after every prefill chunk (question-aware compression); when
            they end the prompt (the question and the template's tail), a selection policy
            chooses its pages from their queries alone, not from the text before them.
        question_aware: eviction probes ``question_ids`` (False: it compresses question-agnostically,
            while a selection policy still chooses from the question).
        sequence: a sequence that already holds a prefix of the prompt
            (``sequence.tokens == prompt_ids[:m]``, e.g. from a prefix cache): only the
            rest is prefilled. ``None``: a fresh one.
        prompt_logits: (V,) logits after the whole prompt when ``sequence`` holds all of it.
        feed_last: once finished, feed the last sampled token (the EOS or the final one)
            so the sequence covers the whole turn (a prefix cache stores it).
        on_release: called with the sequence and the output when the engine lets go of it
            (finished, cancelled or failed: then its KV may be half-written), in the stepping
            thread; e.g. to store the sequence in a prefix cache. Cache and ``tokens`` agree
            unless ``finish_reason == "error"``. Right after it the engine frees the
            sequence's pages (what a prefix index retained stays).
        keep_sequence: the engine does not free the sequence's pages when it lets go of it:
            its owner (a KV memory session) keeps building on it. A cancelled or failed
            request leaves it holding what was fed (``on_release`` cuts it back).
        on_admit: called (in the stepping thread) when the request leaves the queue and starts running:
            its KV is reserved, so the engine will not refuse it any more (a server answers a stream's
            headers then).
        progress: called with (prompt tokens fed, prompt tokens) after every prefill chunk.
        request_id: unique id (default: a counter).
        arrival: ``time.perf_counter()`` when the request arrived (TTFT origin).
        constraint: a grammar (:class:`~longkv.engine.grammar.GrammarConstraint`, fresh for this
            request): before every sample the tokens it forbids are masked out, and the request
            ends (``"stop"``) once the grammar allows nothing more.
    """

    prompt_ids: list[int]
    params: SamplingParams
    policy: KVPolicy
    question_ids: list[int] | None = None
    question_aware: bool = True
    sequence: Sequence | None = None
    prompt_logits: torch.Tensor | None = None
    feed_last: bool = False
    on_release: Callable[[Sequence, RequestOutput], None] | None = None
    keep_sequence: bool = False
    on_admit: Callable[[], None] | None = None
    progress: ProgressFn | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    constraint: GrammarConstraint | None = None


@dataclass
class RequestOutput:
    """What one request did, filled in as it runs (times are ``time.perf_counter()`` seconds).

    Attributes:
        prompt_tokens: length of the prompt.
        reused_tokens: prompt tokens whose KV the request's sequence already held.
        token_ids: generated tokens (an end-of-sequence token is not included).
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"``, ``"cancelled"``,
            ``"error"``; ``None`` while running.
        prompt_logits: (V,) float32 logits after the whole prompt (``None`` until prefilled).
        error: the exception that ended it (``finish_reason == "error"``).
        arrival, admitted, prefill_end, first_token, finished: when it arrived, left the queue, had its
            prompt in the cache, sampled its first token and ended (0.0: not yet).
        peak_kv_bytes, kv_disk_bytes: KV storage at its peak, and in a disk tier at the end.
        dense_read: a selection policy read the whole prompt densely (it was short).
        mask_s, masks: seconds grammar masks added to this request's steps (waiting for a mask computed
            ahead, applying it), and masks applied (``Request.constraint``).
        mask_compute_s: seconds spent computing those masks (ahead, overlapping the forwards).
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logits: torch.Tensor | None = None
    error: BaseException | None = None
    arrival: float = 0.0
    admitted: float = 0.0
    prefill_end: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    peak_kv_bytes: int = 0
    kv_disk_bytes: int = 0
    dense_read: bool = False
    mask_s: float = 0.0
    masks: int = 0
    mask_compute_s: float = 0.0

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens that were actually computed."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def queue_s(self) -> float:
        """Seconds from arrival until the engine admitted the request (waiting for a place or for KV room)."""
        return max(self.admitted - self.arrival, 0.0) if self.admitted else 0.0

    @property
    def prefill_s(self) -> float:
        """Seconds from admission until the prompt was in the cache (queueing not included; other requests'
        work in the same steps is)."""
        start = self.admitted or self.arrival
        return max(self.prefill_end - start, 0.0) if self.prefill_end else 0.0

    @property
    def ttft_s(self) -> float:
        """Seconds from arrival to the first token."""
        return max(self.first_token - self.arrival, 0.0) if self.first_token else 0.0

    @property
    def decode_s(self) -> float:
        """Seconds from the first token to the end."""
        return max(self.finished - self.first_token, 0.0) if self.first_token else 0.0


@dataclass
class TokenEvent:
    """What one step did for one request.

    Attributes:
        request_id: the request.
        token_id: the token sampled this step (``None`` on an event that only ends the request).
        text: new text (may be empty: a character still incomplete, a possible stop string held back).
        finished: the request is over; ``output.finish_reason`` says why.
        output: the request's :class:`RequestOutput` (the same object on every event).
    """

    request_id: str
    token_id: int | None
    text: str
    finished: bool
    output: RequestOutput


class _Running:
    """Engine-side state of one admitted request."""

    __slots__ = ("detok", "feeding", "generator", "out", "pending", "plan", "prompt_logits", "req", "reserved", "runner", "seq", "stops")

    def __init__(self, req: Request, runner: Runner, seq: Sequence, tokenizer: Decoder) -> None:
        self.req, self.runner, self.seq = req, runner, seq
        self.out = RequestOutput(
            prompt_tokens=len(req.prompt_ids), reused_tokens=len(seq.tokens), arrival=req.arrival, admitted=time.perf_counter()
        )
        self.detok = Detokenizer(tokenizer)
        self.stops = StopFilter(req.params.stop)
        self.generator = make_generator(req.params.seed)
        self.plan: PrefillPlan | None = None
        self.pending: int | None = None  # sampled, not yet fed
        self.prompt_logits: torch.Tensor | None = None  # after the prompt's last chunk
        self.reserved = 0  # KV bytes its sequence took at admission
        self.feeding = False  # finished; one last forward feeds ``pending`` (Request.feed_last)


def over_kv_budget(prompt_tokens: int, new_tokens: int, policy: str, need: int, budget: int) -> str:
    """The error of a request whose KV reservation (``need`` bytes) exceeds the whole KV budget."""
    return (f"the request needs {_mib(need)} of KV ({prompt_tokens} prompt tokens + {new_tokens} new under {policy}), "
            f"more than the engine's KV budget of {_mib(budget)}: lower max_tokens, use an eviction policy with a budget "
            "(e.g. snapkv:budget=2048), or raise the KV budget")  # fmt: skip


class Engine:
    """Runs requests in batched steps over one model.

    Args:
        model: the model forward.
        tokenizer: decodes token ids (``decode(ids, skip_special_tokens=True)``).
        eos_ids: token ids that end a generation.
        config: chunk size (the unit of prefill), page size, device (the model's).
        max_num_seqs: most sequences running at once (the rest wait).
        max_step_tokens: tokens one step may feed (decode tokens + prompt chunks; the
            first prompt chunk always fits). Default: ``chunk_size``.
        pools: the page pools every sequence takes its KV pages from (default: new ones).
        kv_budget_bytes: most KV bytes the running sequences may reserve together
            (``None``: no limit). A sequence reserves at admission the pages it can
            hold at most (prompt + max new tokens; an eviction policy its budget + a
            chunk per layer; a sequence handed in, what it holds and has reserved);
            the next waiting request is admitted only while its reservation fits
            beside the others' (first come, first served: it waits for pages to come
            back). One that cannot fit even alone ends at once with
            ``finish_reason="error"`` and a :class:`~longkv.errors.LongKVError`.

    Raises:
        ValueError: ``max_num_seqs`` or ``max_step_tokens`` below 1, a negative
            ``kv_budget_bytes``, or the model on another device than ``config.device``.
    """

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Decoder,
        eos_ids: frozenset[int],
        config: EngineConfig,
        max_num_seqs: int = 8,
        max_step_tokens: int | None = None,
        pools: KVPools | None = None,
        kv_budget_bytes: int | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if kv_budget_bytes is not None and kv_budget_bytes < 0:
            raise ValueError(f"kv_budget_bytes must be >= 0, got {kv_budget_bytes}")
        self.kv_budget_bytes = kv_budget_bytes
        self._need: dict[str, int] = {}  # request id -> bytes its reservation took (measured once, while it waits)
        if model.device != torch.device(config.device):
            raise ValueError(f"the model's weights are on {model.device}, the engine runs on {config.device}: build it there")
        self.model, self.tokenizer, self.eos_ids, self.config = model, tokenizer, eos_ids, config
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens if max_step_tokens is not None else config.chunk_size
        if self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1, got {self.max_step_tokens}")
        self.pools = pools if pools is not None else KVPools(config.page_size, model.device)
        self.waiting: deque[Request] = deque()
        self.running: list[_Running] = []
        self._aborted: set[str] = set()
        self.last_batch_size = 0  # sequences in the last step's forward
        self.steps = 0

    # ------------------------------------------------------------------ queue
    def add_request(self, request: Request) -> str:
        """Queue ``request``; it joins the batch at a later step. Returns its id.

        Raises:
            ValueError: an empty prompt, or a ``sequence`` that is not a prefix of the prompt.
        """
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        seq = request.sequence
        if seq is not None:
            m = len(seq.tokens)
            if seq.tokens != request.prompt_ids[:m]:
                raise ValueError("the request's sequence must hold a prefix of its prompt")
            if m == len(request.prompt_ids) and request.prompt_logits is None:
                raise ValueError("a sequence holding the whole prompt needs the prompt's logits")
        self.waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request (safe from any thread): it ends at the next step, or within a layer if running."""
        self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_finishing(self) -> int:
        """Finished sequences still feeding their last token (``Request.feed_last``) before release."""
        return sum(1 for r in self.running if r.feeding)

    def kv_bytes(self) -> int:
        """KV bytes allocated by the running sequences."""
        return sum(r.seq.cache.bytes() for r in self.running)

    def reserved_bytes(self) -> int:
        """KV bytes the running sequences reserved at admission (what ``kv_budget_bytes`` bounds)."""
        return sum(r.reserved for r in self.running)

    # ------------------------------------------------------------------ step
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests, run one batched forward, sample; one event per request that moved.

        A request whose forward raised ends with ``finish_reason="error"`` (and so do the
        others of that forward, whose caches may be half-written). Last, pools whose
        free pages outnumber the used ones are compacted (``KVPools.compact``): no slot
        number is in flight between steps, and the next admission finds the room.
        """
        try:
            return self._step()
        finally:
            self.pools.compact()

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._reap_aborted(events)
        self._admit(events)
        works, owners = self._schedule(events)
        if not works:
            return events
        self.last_batch_size = len(works)
        self.steps += 1
        aborted = self._aborted
        ids = {o.req.request_id for o in owners}
        try:
            logits = run_batch(self.model, works, lambda: bool(aborted) and not aborted.isdisjoint(ids))
        except Interrupted:  # caches are rolled back: the others redo their share next step
            for w, o in zip(works, owners, strict=True):
                if o.plan is not None:
                    o.plan.undo(w)
            self._reap_aborted(events)
            return events
        except Exception as exc:  # a bug: end the requests of this forward, keep serving the others
            for o in owners:
                o.out.error = exc
                self._finish(o, "error", events)
            return events
        now = time.perf_counter()
        for o, lg in zip(owners, logits, strict=True):
            if o.feeding:
                self._release(o)
                continue
            if o.plan is not None:
                if lg is not None:
                    o.prompt_logits = lg  # the last chunk's; a compression probe may still follow
                if not o.plan.done:
                    continue
                lg = o.prompt_logits
                self._prompt_done(o, lg, now)
            if lg is not None:
                self._next(o, lg, events)
        return events

    def _reap_aborted(self, events: list[TokenEvent]) -> None:
        if not self._aborted:
            return
        gone = set(self._aborted)
        self._aborted.difference_update(gone)
        for req in [r for r in self.waiting if r.request_id in gone]:
            self.waiting.remove(req)
            self._need.pop(req.request_id, None)
            out = RequestOutput(prompt_tokens=len(req.prompt_ids), finish_reason="cancelled", arrival=req.arrival)
            out.finished = time.perf_counter()
            events.append(TokenEvent(req.request_id, None, "", True, out))
            if req.sequence is not None:
                try:
                    if req.on_release is not None:
                        req.on_release(req.sequence, out)
                finally:
                    if not req.keep_sequence:
                        req.sequence.cache.clear()
        for o in [o for o in self.running if o.req.request_id in gone]:
            if o.feeding:
                self._release(o)
            elif o.out.finish_reason is None:
                self._finish(o, "cancelled", events)

    def _admit(self, events: list[TokenEvent]) -> None:
        budget = self.kv_budget_bytes
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            held = self.reserved_bytes()
            need = self._need.get(req.request_id)
            if budget is not None and need is not None and held + need > budget:
                break  # still no room: wait for pages to come back
            try:  # a request whose cache cannot be made (a policy's bad knob) ends alone: the others go on
                runner = Runner(self.model, req.policy, self.config, self.pools)
                seq = req.sequence or runner.new_sequence(len(req.prompt_ids) + req.params.max_new_tokens + int(req.feed_last))
            except Exception as exc:
                self.waiting.popleft()
                self._need.pop(req.request_id, None)
                self._end_waiting(req, exc, events)
                continue
            reserved = seq.cache.bytes()
            if budget is not None and held + reserved > budget:
                if req.sequence is None:
                    seq.cache.clear()  # measured: give the pages back until it fits
                if reserved > budget:  # it would not fit even alone: waiting would block the queue for good
                    self.waiting.popleft()
                    self._need.pop(req.request_id, None)
                    self._refuse(req, reserved, events)
                    continue
                self._need[req.request_id] = reserved
                break
            self.waiting.popleft()
            self._need.pop(req.request_id, None)
            pol = req.policy
            if req.question_ids and req.question_aware and pol.needs_queries and pol.budget_tokens is not None:
                seq.probe_ids = list(req.question_ids)
            if seq.selection is not None:  # a selection policy chooses from the question's own queries
                q = req.question_ids or []
                seq.selection.question_tokens = len(q) if q and req.prompt_ids[-len(q) :] == q else 0
            o = _Running(req, runner, seq, self.tokenizer)
            o.reserved = reserved
            self.running.append(o)
            if req.on_admit is not None:
                req.on_admit()
            rest = req.prompt_ids[len(seq.tokens) :]
            if rest:
                o.plan = runner.plan_prefill(seq, rest)
            else:  # the whole prompt was cached with its logits
                assert req.prompt_logits is not None
                self._prompt_done(o, req.prompt_logits, time.perf_counter())
                self._next(o, req.prompt_logits, events)

    def _refuse(self, req: Request, need: int, events: list[TokenEvent]) -> None:
        """End a request whose KV reservation exceeds the whole budget."""
        assert self.kv_budget_bytes is not None
        msg = over_kv_budget(len(req.prompt_ids), req.params.max_new_tokens, req.policy.name, need, self.kv_budget_bytes)
        self._end_waiting(req, LongKVError(msg), events)

    def _end_waiting(self, req: Request, exc: BaseException, events: list[TokenEvent]) -> None:
        """End a request taken off the waiting queue before it ran, with ``exc`` as its error."""
        out = RequestOutput(prompt_tokens=len(req.prompt_ids), finish_reason="error", arrival=req.arrival)
        out.error = exc
        out.finished = time.perf_counter()
        events.append(TokenEvent(req.request_id, None, "", True, out))
        if req.sequence is not None:
            try:
                if req.on_release is not None:
                    req.on_release(req.sequence, out)
            finally:
                if not req.keep_sequence:
                    req.sequence.cache.clear()

    def _schedule(self, events: list[TokenEvent]) -> tuple[list[Work], list[_Running]]:
        works: list[Work] = []
        owners: list[_Running] = []
        for o in self.running:  # every decoding sequence feeds its last token
            if o.plan is None and o.pending is not None:
                works.append(Work(o.runner, o.seq, [o.pending], decode=True, logits=not o.feeding))
                owners.append(o)
        budget = self.max_step_tokens - len(works)
        prefilling = sorted((o for o in self.running if o.plan is not None), key=lambda o: o.plan.remaining if o.plan else 0)
        for i, o in enumerate(prefilling):
            assert o.plan is not None
            try:  # at the question a selection policy plans its page choice (its needs are works too)
                n = o.plan.peek()
                if i > 0 and n > budget:
                    continue
                mine = o.plan.next_works(max(budget, n))
            except Exception as exc:
                o.out.error = exc
                self._finish(o, "error", events)
                continue
            works.extend(mine)
            owners.extend([o] * len(mine))
            budget -= sum(len(w.ids) for w in mine)
        return works, owners

    def _prompt_done(self, o: _Running, logits: torch.Tensor | None, now: float) -> None:
        o.plan = None
        o.seq.probe_ids = []
        o.out.prompt_logits = logits
        o.out.prefill_end = now
        o.out.dense_read = o.seq.selection is not None and o.seq.selection.dense

    def _next(self, o: _Running, logits: torch.Tensor, events: list[TokenEvent]) -> None:
        if o.req.params.max_new_tokens == 0:
            self._finish(o, "length", events)
        else:
            self._sample(o, logits, events)

    def _sample(self, o: _Running, logits: torch.Tensor, events: list[TokenEvent]) -> None:
        params, out, grammar = o.req.params, o.out, o.req.constraint
        try:
            if grammar is not None:
                logits = grammar.mask(logits, () if params.ignore_eos else self.eos_ids, params.temperature)
            token = sample(logits, params, o.generator, out.token_ids)
            if grammar is not None:
                grammar.accept(token)
                out.mask_s, out.masks, out.mask_compute_s = grammar.mask_s, grammar.masks, grammar.compute_s
        except LongKVError as exc:  # the grammar allows no token: end this request, not the step
            out.error = exc
            self._finish(o, "error", events)
            return
        if not out.first_token:
            out.first_token = time.perf_counter()
        o.pending = token
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(o, "stop", events, token=token)
            return
        out.token_ids.append(token)
        text, stopped = o.stops.push(o.detok.add(token))
        if grammar is not None and grammar.done and not stopped:  # complete: nothing more may follow
            self._finish(o, "stop", events, text + o.stops.push(o.detok.flush())[0] + o.stops.flush(), token)
        elif stopped:
            self._finish(o, "stop", events, text, token)
        elif len(out.token_ids) >= params.max_new_tokens:
            self._finish(o, "length", events, text + o.stops.push(o.detok.flush())[0] + o.stops.flush(), token)
        else:
            events.append(TokenEvent(o.req.request_id, token, text, False, out))

    def _finish(self, o: _Running, reason: str, events: list[TokenEvent], text: str = "", token: int | None = None) -> None:
        out = o.out
        out.finish_reason = reason
        out.finished = time.perf_counter()
        out.peak_kv_bytes = max(o.seq.peak_kv_bytes, o.seq.cache.bytes())
        out.kv_disk_bytes = sum(lkv.disk_bytes() for lkv in o.seq.cache.layers)
        events.append(TokenEvent(o.req.request_id, token, text, True, out))
        if reason in ("stop", "length") and o.req.feed_last and o.pending is not None:
            o.feeding = True  # one more forward, in the next step's batch
        else:
            self._release(o)

    def _release(self, o: _Running) -> None:
        if o in self.running:
            self.running.remove(o)
        if o.plan is not None:
            o.plan.close()  # a selection's fresh sequences give their pages back
        o.seq.probe_ids, o.seq.probe_due = [], None
        try:
            if o.req.on_release is not None:
                o.req.on_release(o.seq, o.out)
        finally:
            if not o.req.keep_sequence:
                o.seq.cache.clear()  # its pages go back to the pool (a prefix index keeps what it retained)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
