"""The engine thread: one generation at a time, a bounded wait queue, and the prefix cache.

HTTP handlers (asyncio) never run the model. They turn a request into an
:class:`EngineRequest` with :func:`plan` (tokens, policy, limits: every user error
is raised here, before anything is queued), :meth:`EngineWorker.submit` it, and
read the :class:`Event` s it sends back. The engine runs in one thread of its own,
so the event loop keeps answering (``/health`` during a long prefill), and a job
whose client went away is stopped between two layers (see
:class:`~longkv.engine.session.StoppableRunner`).

Prefix reuse is fail-closed: a request shares the prefix cache only when its KV is
provably what the dense policy computes (dense itself, or streaming whose budget
is never reached), and KV is inserted only after checking the sequence holds every
position in order.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from longkv.engine.llm import LLM
from longkv.engine.sampling import SamplingParams
from longkv.engine.session import Cancelled, StoppableRunner, Turn, continue_generation, feed_pending, rollback
from longkv.errors import LongKVError
from longkv.policies import KVPolicy
from longkv.server.prefix_cache import PrefixCache, namespace, shares_dense_kv

if TYPE_CHECKING:
    from longkv.server.metrics import Metrics

log = logging.getLogger("longkv.server")


class ContextOverflow(LongKVError):
    """Prompt (+ max_tokens) does not fit the model's window under the request's policy."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int, max_tokens: int | None, policy: str) -> None:
        self.n_prompt_tokens, self.n_ctx, self.max_tokens = n_prompt_tokens, n_ctx, max_tokens
        if n_prompt_tokens >= n_ctx:
            what = f"the prompt has {n_prompt_tokens} tokens, the model's window is {n_ctx}"
        else:
            what = f"{n_prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the model's window of {n_ctx} tokens"
        super().__init__(
            f"{what} under the {policy} policy: shorten the prompt, lower max_tokens, or pass "
            f'"longkv": {{"policy": "auto"}} to read past the window with block_topk '
            f'(or {{"policy": "streaming"}} to keep only a recent window)'
        )


class QueueFull(Exception):
    """More requests are waiting than the server allows: retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class ServerConfig:
    """How the server serves.

    Attributes:
        model_id: the id clients send as ``model`` (GET /v1/models lists it).
        default_policy: policy spec when a request names none.
        default_max_tokens: ``max_tokens`` when a request gives none (capped by the
            window left under window-bound policies).
        max_tokens_limit: most tokens one request may ask for (``None``: the window).
        max_queue: requests that may wait while one runs; beyond it, 429.
        cache_bytes: prefix cache budget in bytes (0: off).
        max_sessions: sessions pinning a path at once.
    """

    model_id: str
    default_policy: str = "dense"
    default_max_tokens: int = 1024
    max_tokens_limit: int | None = None
    max_queue: int = 16
    cache_bytes: int = 2 << 30
    max_sessions: int = 256


@dataclass
class EngineRequest:
    """A validated generation, ready to queue."""

    ids: list[int]
    params: SamplingParams
    policy: KVPolicy
    share_cache: bool
    session: str | None = None
    salt: str = ""


@dataclass
class Event:
    """What the engine thread reports about a job: ``start`` (with ``cached_tokens``), ``text``, ``done``, ``error``."""

    kind: str
    text: str = ""
    cached_tokens: int = 0
    turn: Turn | None = None
    error: BaseException | None = None


@dataclass
class Job:
    """One queued or running request. ``sink`` receives its events (from the engine thread)."""

    request: EngineRequest
    sink: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    finished: bool = False
    turn: Turn = field(default_factory=Turn)


def plan(
    llm: LLM,
    config: ServerConfig,
    ids: list[int],
    max_tokens: int | None,
    params: dict[str, Any],
    policy: str | None = None,
    budget: int | None = None,
    session: str | None = None,
    share_cache: bool = True,
    salt: str | None = None,
) -> EngineRequest:
    """Check a request against the model and the server's limits; build its :class:`EngineRequest`.

    Args:
        ids: prompt token ids.
        max_tokens: requested, or ``None`` for the server's default.
        params: other :class:`SamplingParams` fields (temperature, top_p, top_k, seed, stop, ignore_eos).

    Raises:
        ContextOverflow: a window-bound policy (dense) and prompt + max_tokens beyond the window.
        LongKVError: empty prompt, unknown token ids, bad policy or sampling values, max_tokens over the limit.
    """
    if not ids:
        raise LongKVError("the prompt is empty: send some text")
    bad = [t for t in ids if not 0 <= t < llm.config.vocab_size]
    if bad:
        raise LongKVError(f"token id {bad[0]} is outside the vocabulary [0, {llm.config.vocab_size}): send valid ids")
    if max_tokens is not None and config.max_tokens_limit is not None and max_tokens > config.max_tokens_limit:
        raise LongKVError(f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens_limit}: ask for fewer")
    spec = policy if policy is not None else config.default_policy
    wanted = max_tokens if max_tokens is not None else config.default_max_tokens
    # "auto" picks dense or streaming from the total length; any other spec does not depend on it.
    pol = llm.resolve_policy(len(ids) + wanted if spec == "auto" else 0, spec, budget)
    limit = pol.max_context(llm.config)
    if limit is not None:
        if max_tokens is None:
            wanted = min(wanted, limit - len(ids))
        if len(ids) >= limit or len(ids) + wanted > limit:
            raise ContextOverflow(len(ids), limit, max_tokens, pol.describe())
    if config.max_tokens_limit is not None:
        wanted = min(wanted, config.max_tokens_limit)
    sampling = SamplingParams(max_new_tokens=wanted, **params)
    share = share_cache and config.cache_bytes > 0 and shares_dense_kv(pol, len(ids) + wanted + 1)
    return EngineRequest(ids, sampling, pol, share, session, salt or "")


class EngineWorker:
    """Runs queued generations one at a time in a thread of its own.

    Args:
        llm: the loaded model.
        config: limits and cache budget.
        metrics: where to count (optional).
    """

    def __init__(self, llm: LLM, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.cache = PrefixCache(config.cache_bytes, config.max_sessions)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._current: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="longkv-engine", daemon=True)
        self._fingerprint = namespace(llm.source, llm.engine_config.dtype, f"int8={llm.int8_decode}", "dense-kv")

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and end the thread."""
        with self._cv:
            self._stop = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._current is not None:
                self._current.cancel.set()
            self._cv.notify_all()
        for job in waiting:
            self._finish(job, Event("done", turn=job.turn))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return 0 if self._current is None else 1

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, request: EngineRequest, sink: Callable[[Event], None]) -> Job:
        """Queue a request. Raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        job = Job(request, sink)
        with self._cv:
            if self._stop:
                raise QueueFull(5)
            busy = self._current is not None or bool(self._waiting)
            if busy and len(self._waiting) >= self.config.max_queue:
                raise QueueFull(max(1, len(self._waiting)))
            self._waiting.append(job)
            self._gauges()
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job: dropped at once if it waits, stopped within a layer if it runs."""
        job.cancel.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running or done: the engine thread sees the flag
            self._gauges()
        job.turn.finish_reason = "cancelled"
        self._finish(job, Event("done", turn=job.turn))

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._current = self._waiting.popleft()
                self._gauges()
            try:
                with torch.inference_mode():
                    self._run(job)
            except Exception as exc:  # a bug, not a user error: report it on this request only
                log.exception("generation failed")
                self._finish(job, Event("error", error=exc))
            finally:
                with self._cv:
                    self._current = None
                    self._gauges()

    def _run(self, job: Job) -> None:
        req, llm, turn = job.request, self.llm, job.turn
        runner = StoppableRunner(llm.model, req.policy, llm.engine_config, job.cancel.is_set)
        seq = runner.new_sequence(len(req.ids) + req.params.max_new_tokens + 1)
        ns = namespace(self._fingerprint, req.salt)
        reuse, logits = 0, None
        if req.share_cache:
            match = self.cache.match(ns, req.ids)
            # A whole prompt is reused only with the logits a run computed after it; else
            # its last token is recomputed to get them.
            full = match.length == len(req.ids) and match.logits is not None
            reuse = match.length if full else min(match.length, len(req.ids) - 1)
            if reuse:
                self.cache.load(match, seq.cache, reuse)
                seq.tokens = list(req.ids[:reuse])
                logits = match.logits if full else None
            if self.metrics is not None:
                (self.metrics.cache_hits if reuse else self.metrics.cache_misses).inc()
        elif self.metrics is not None:
            self.metrics.cache_bypass.inc()
        job.sink(Event("start", cached_tokens=reuse))
        try:
            for piece in continue_generation(llm, runner, seq, req.ids, req.params, turn, logits, job.created):
                job.sink(Event("text", piece))
        except Cancelled:
            rollback(seq)
        if self.metrics is not None:
            self.metrics.active_kv_bytes.set(seq.cache.bytes())
            self.metrics.observe_turn(turn)
        self._finish(job, Event("done", turn=turn))
        if req.share_cache:  # after the answer is out: extend and store the path
            if turn.finish_reason != "cancelled":
                try:
                    feed_pending(runner, seq, turn)
                except Cancelled:
                    rollback(seq)
            memo = {len(req.ids): turn.prompt_logits} if turn.prompt_logits is not None else {}
            before = self.cache.stats.evictions, self.cache.stats.evicted_tokens
            self.cache.insert(ns, seq.tokens, seq.cache, memo, fresh_from=reuse, session=req.session)
            if self.metrics is not None:
                self.metrics.cache_evictions.inc(self.cache.stats.evictions - before[0])
                self.metrics.cache_evicted_tokens.inc(self.cache.stats.evicted_tokens - before[1])
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.cache.bytes)
            self.metrics.cache_tokens.set(self.cache.tokens)
            self.metrics.active_kv_bytes.set(0)

    def _finish(self, job: Job, event: Event) -> None:
        if job.finished:
            return
        job.finished = True
        job.sink(event)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self._waiting))
            self.metrics.running.set(self.running)
