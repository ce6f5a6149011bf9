"""The engine thread: the step loop, a bounded wait queue, and the prefix cache.

HTTP handlers (asyncio) never run the model. They turn a request into an
:class:`EngineRequest` with :func:`plan` (tokens, policy, limits: every user error
is raised here, before anything is queued), :meth:`EngineWorker.submit` it, and
read the :class:`Event` s it sends back. The engine runs in one thread of its own,
so the event loop keeps answering (``/health`` during a long prefill). Up to
``max_num_seqs`` requests share each batched step (:mod:`longkv.engine.engine`);
a job whose client went away is stopped before the next layer of the running
forward, and its sequence leaves the batch.

Prefix reuse is fail-closed: a request shares the prefix cache only when its KV is
provably what the dense policy computes (``KVPolicy.dense_kv_upto``: dense with an
uncoded store, or streaming whose budget is never reached), under a namespace
that names everything deciding the KV bytes (model, dtype, weights, KV codec),
and KV is inserted only after checking the sequence holds every position in order.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longkv.engine.engine import Engine, Request, RequestOutput, TokenEvent, over_kv_budget
from longkv.engine.grammar import GrammarConstraint
from longkv.engine.llm import LLM
from longkv.engine.runner import Runner, Sequence
from longkv.engine.sampling import SamplingParams
from longkv.errors import LongKVError
from longkv.kv.radix import PrefixCache, namespace, reuse_length, shares_dense_kv
from longkv.policies import KVPolicy
from longkv.server.sessions import Pieces, SessionStore, prepare

if TYPE_CHECKING:
    from longkv.engine.memory import KVMemory
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


class ServerStopping(Exception):
    """The server is shutting down: the request was ended (or refused) for that, not for anything it asked."""


@dataclass
class ServerConfig:
    """How the server serves.

    Attributes:
        model_id: the id clients send as ``model`` (GET /v1/models lists it).
        default_policy: policy spec when a request names none.
        default_max_tokens: ``max_tokens`` when a request gives none (capped by the
            window left under window-bound policies, and by what ``kv_budget_bytes`` leaves after the prompt
            under a policy that keeps every token).
        max_tokens_limit: most tokens one request may ask for (``None``: the window).
        max_queue: requests that may wait while ``max_num_seqs`` run; beyond it, 429.
        max_num_seqs: requests decoded together in one batch.
        cache_bytes: prefix cache budget in bytes (0: off).
        max_sessions: sessions pinning a path at once.
        kv_budget_bytes: most KV bytes the running requests reserve together (``None``: no
            limit; see :class:`~longkv.engine.engine.Engine`): a request waits until its
            pages fit, one that never fits gets HTTP 400 with its numbers.
        memory_bytes: most KV bytes idle KV memory sessions hold in RAM (least recently
            used first out).
        memory_dir: where sessions are saved (on request, and when pushed out of RAM);
            ``None``: nowhere.
    """

    model_id: str
    default_policy: str = "dense"
    default_max_tokens: int = 1024
    max_tokens_limit: int | None = None
    max_queue: int = 16
    max_num_seqs: int = 8
    cache_bytes: int = 2 << 30
    max_sessions: int = 256
    kv_budget_bytes: int | None = None
    memory_bytes: int = 4 << 30
    memory_dir: Path | None = None


@dataclass
class MemoryRequest:
    """A request on a KV memory session (``longkv.memory``; see :mod:`longkv.engine.memory`).

    Attributes:
        session: the session id.
        tool_keep: share of each tool result's KV kept once a step has read it whole (``None``: all).
        drop: span ids to cut out first.
        save: write the session to the memory folder after the request.
        pieces: where the prompt's messages end (chat), for their span kinds; ``None``: one ``text`` span.
    """

    session: str
    tool_keep: float | None = 0.5
    drop: list[int] = field(default_factory=list)
    save: bool = False
    pieces: Pieces | None = None


@dataclass
class EngineRequest:
    """A validated generation, ready to queue."""

    ids: list[int]
    params: SamplingParams
    policy: KVPolicy
    share_cache: bool
    session: str | None = None
    salt: str = ""
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")
    constraint: GrammarConstraint | None = None
    memory: MemoryRequest | None = None
    question_ids: list[int] | None = None  # the prompt's last tokens that are its question (Request.question_ids)

    @property
    def kv_key(self) -> str:
        """What, besides the model and dtype, decides this request's KV bytes: the KV codec."""
        return f"kv={self.policy.kv_quant}"


@dataclass
class Event:
    """What the engine thread reports about a job: ``start`` (with ``cached_tokens``), ``admitted`` (it left the
    engine's queue: its KV is reserved, the engine will not refuse it now), ``text``, ``done``, ``error``."""

    kind: str
    text: str = ""
    cached_tokens: int = 0
    output: RequestOutput | None = None
    error: BaseException | None = None


@dataclass
class Job:
    """One queued or running request. ``sink`` receives its events (from the engine thread)."""

    request: EngineRequest
    sink: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    finished: bool = False
    output: RequestOutput = field(default_factory=RequestOutput)
    request_id: str | None = None  # set when the job enters the engine
    last_token_at: float = 0.0
    memory_report: dict[str, Any] | None = None  # a KV memory request's session after it (engine thread, before "done")


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
    constraint: GrammarConstraint | None = None,
    memory: MemoryRequest | None = None,
    question_ids: list[int] | None = None,
) -> EngineRequest:
    """Check a request against the model and the server's limits; build its :class:`EngineRequest`.

    Args:
        ids: prompt token ids.
        max_tokens: requested, or ``None`` for the server's default.
        params: other :class:`SamplingParams` fields (temperature, top_p, top_k, seed, stop, ignore_eos).
        constraint: a started grammar the reply must follow (tool calls, JSON).
        memory: run on a KV memory session: the prompt may exceed the window (the session
            holds its spans compressed; the fit is checked at admission).
        question_ids: the prompt's last tokens that are its question (see
            :class:`~longkv.engine.engine.Request`); not used by a memory request.

    Raises:
        ContextOverflow: a window-bound policy (dense) and prompt + max_tokens beyond the window.
        LongKVError: empty prompt, unknown token ids, bad policy or sampling values, max_tokens over the limit.
    """
    if not ids:
        raise LongKVError("the prompt is empty: send some text")
    llm.check_ids(ids)
    if max_tokens is not None and config.max_tokens_limit is not None and max_tokens > config.max_tokens_limit:
        raise LongKVError(f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens_limit}: ask for fewer")
    if memory is not None:
        if policy not in (None, "dense") or budget is not None:
            raise LongKVError("KV memory runs under the dense policy with plain pages (no kv_quant): leave policy and budget out of a memory request")
        window = llm.config.max_position
        wanted = max_tokens if max_tokens is not None else min(config.default_max_tokens, window // 4)
        if config.max_tokens_limit is not None:
            wanted = min(wanted, config.max_tokens_limit)
        if wanted >= window:
            raise ContextOverflow(len(ids), window, wanted, "dense (KV memory)")
        pol = llm.resolve_policy(0, "dense", None)
        share = share_cache and config.cache_bytes > 0 and shares_dense_kv(pol, window)  # a new session's first message
        return EngineRequest(ids, SamplingParams(max_new_tokens=wanted, **params), pol, share, session, salt or "", constraint=constraint, memory=memory)
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
    runner = Runner(llm.model, pol, llm.engine_config) if config.kv_budget_bytes is not None else None
    page = runner.reservation(llm.engine_config.page_size) if runner is not None else None  # one page in every layer
    if max_tokens is None and page and config.kv_budget_bytes is not None and pol.budget_tokens is None:
        # the default fits the KV budget too (a policy that keeps every token reserves prompt + new tokens), with a
        # page per layer to spare: a prompt found in the prefix cache reserves up to that much more
        ps = llm.engine_config.page_size
        room = config.kv_budget_bytes // page * ps - len(ids) - 1 - ps
        if room >= 1:
            wanted = min(wanted, room)
    sampling = SamplingParams(max_new_tokens=wanted, **params)
    share = share_cache and config.cache_bytes > 0 and shares_dense_kv(pol, len(ids) + wanted + 1)
    if runner is not None and config.kv_budget_bytes is not None:  # a request that could never fit is refused now, before it queues
        need = runner.reservation(len(ids) + wanted + int(share))
        if need is not None and need > config.kv_budget_bytes:
            raise LongKVError(over_kv_budget(len(ids), wanted, pol.name, need, config.kv_budget_bytes))
    return EngineRequest(ids, sampling, pol, share, session, salt or "", constraint=constraint, question_ids=question_ids)


class EngineWorker:
    """Runs the step loop (:class:`~longkv.engine.engine.Engine`) in a thread of its own.

    Up to ``config.max_num_seqs`` requests run together, one batched forward per step;
    up to ``config.max_queue`` more wait (beyond that, :class:`QueueFull`). A job joins
    the batch between two steps; its prefix-cache lookup happens then, so it finds what
    the jobs before it stored.

    Args:
        llm: the loaded model.
        config: limits and cache budget.
        metrics: where to count (optional).
    """

    def __init__(self, llm: LLM, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self._compactions = 0  # pool compactions counted into the metrics so far
        self.cache = PrefixCache(config.cache_bytes, config.max_sessions)
        self.engine = Engine(
            llm.model, llm.tokenizer, llm.eos_ids, llm.engine_config, config.max_num_seqs, kv_budget_bytes=config.kv_budget_bytes
        )
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # request id -> job, for the jobs in the engine
        self._cv = threading.Condition()
        self._stop = False
        self._closing = False  # end_all ran: no new requests
        self._thread = threading.Thread(target=self._loop, name="longkv-engine", daemon=True)
        # the model file's size too: a file replaced at the same path (another model) does not read old snapshots
        size = [f"{os.path.getsize(llm.source)} bytes"] if os.path.isfile(llm.source) else []
        self._fingerprint = namespace(llm.source, *size, llm.engine_config.dtype, f"weights={llm.decode_weights}")
        self.sessions = SessionStore(config.memory_bytes, config.memory_dir, self._fingerprint)

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and end the thread."""
        with self._cv:
            self._stop = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for rid in list(self._jobs):
                self.engine.abort(rid)
            self._cv.notify_all()
        for job in waiting:
            job.output.finish_reason = "cancelled"
            self._finish(job, Event("done", output=job.output))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # the engine thread is done with them: idle sessions go to --memory-dir
            self.sessions.save_all()

    def drain(self, reason: str) -> None:
        """Take no new jobs and end those still waiting for a place with :class:`ServerStopping` (``reason``); the
        running ones go on (a shutdown's grace period). Safe from any thread."""
        with self._cv:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._gauges()
        for job in waiting:
            self._finish(job, Event("error", error=ServerStopping(f"{reason}: send the request again once it is back")))

    def end_all(self, reason: str) -> None:
        """:meth:`drain`, then end the running jobs too: a shutdown's grace period is over. Safe from any thread;
        the engine stops each within a layer."""
        self.drain(reason)
        with self._cv:
            running = list(self._jobs.values())
            self._jobs.clear()
            for job in running:
                self.engine.abort(job.request.request_id)
            self._cv.notify_all()
        for job in running:
            self._finish(job, Event("error", error=ServerStopping(f"{reason}: send the request again once it is back")))

    @property
    def running(self) -> int:
        """Jobs in the engine's batch (or about to join it)."""
        return len(self._jobs)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, request: EngineRequest, sink: Callable[[Event], None]) -> Job:
        """Queue a request. Raises :class:`QueueFull` when ``max_num_seqs`` requests run (or are about to) and
        ``max_queue`` more already wait."""
        job = Job(request, sink)
        with self._cv:
            if self._stop or self._closing:
                raise ServerStopping("the server is shutting down: send the request again once it is back")
            # a burst arrives while the engine thread is inside a step: count what waits for a free place too
            places = max(self.config.max_num_seqs - len(self._jobs), 0)
            if len(self._waiting) >= places + self.config.max_queue:
                raise QueueFull(max(1, len(self._waiting) - places))
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
                if job.request_id is not None:
                    self.engine.abort(job.request_id)  # running: the engine stops before its next layer
                return
            self._gauges()
        job.output.finish_reason = "cancelled"
        self._finish(job, Event("done", output=job.output))

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._jobs and not self._stop and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stop and not self._jobs and not self.engine.has_unfinished():
                    return
                admitted = []
                # A finished sequence may still feed its last token before it is stored in the prefix
                # cache: a job arriving meanwhile (the next turn of that chat) waits for that one step.
                ready = not self.engine.num_finishing
                while ready and self._waiting and len(self._jobs) < self.config.max_num_seqs and not self._stop:
                    job = self._waiting.popleft()
                    admitted.append(job)
                    self._jobs[job.request.request_id] = job
                self._gauges()
            for job in admitted:
                try:
                    with torch.inference_mode():  # admission writes pages (a prefix copied in, a session's edits)
                        self._admit(job)
                except Exception as exc:  # a bug in one admission: that request fails, the server goes on
                    log.exception("admitting a request failed")
                    self._drop_job(job, exc)
            try:
                with torch.inference_mode():
                    events = self.engine.step()
            except Exception as exc:  # a bug outside any one request: fail them all, keep serving
                log.exception("engine step failed")
                events = []
                with self._cv:  # every job ends here: none may hold a place in max_num_seqs afterwards
                    failed = list(self._jobs.values())
                    self._jobs.clear()
                for job in failed:
                    self.engine.abort(job.request.request_id)
                    self._finish(job, Event("error", error=exc))
                try:
                    with torch.inference_mode():
                        self.engine.step()  # releases the aborted requests
                except Exception:
                    log.exception("releasing the failed step's requests failed")
            for ev in events:
                self._dispatch(ev)
            self._gauges()

    def _admit(self, job: Job) -> None:
        """Look the job's prompt up in the prefix cache (or open its KV memory session) and hand it to the engine."""
        req, llm = job.request, self.llm
        if req.memory is not None:
            self._admit_memory(job, req.memory)
            return
        ns = namespace(self._fingerprint, req.kv_key, req.salt)
        reuse, logits, seq = 0, None, None
        if req.share_cache:
            match = self.cache.match(ns, req.ids)
            reuse = reuse_length(match, len(req.ids), llm.engine_config.chunk_size)
            full = reuse == len(req.ids)
            if reuse:
                runner = Runner(llm.model, req.policy, llm.engine_config, self.engine.pools)
                seq = runner.new_sequence()
                self.cache.load(match, seq.cache, reuse)  # attaches the cached pages: no copy
                seq.cache.reserve(len(req.ids) + req.params.max_new_tokens + 1)
                seq.tokens = list(req.ids[:reuse])
                logits = match.logits if full else None
            if self.metrics is not None:
                (self.metrics.cache_hits if reuse else self.metrics.cache_misses).inc()
        elif self.metrics is not None:
            self.metrics.cache_bypass.inc()

        def release(seq: Sequence, out: RequestOutput) -> None:  # engine thread, after the answer is out
            if not req.share_cache or out.finish_reason == "error":
                return
            memo = {len(req.ids): out.prompt_logits} if out.prompt_logits is not None else {}
            before = self.cache.stats.evictions, self.cache.stats.evicted_tokens
            self.cache.insert(ns, seq.tokens, seq.cache, memo, fresh_from=reuse, session=req.session)
            if self.metrics is not None:
                self.metrics.cache_evictions.inc(self.cache.stats.evictions - before[0])
                self.metrics.cache_evicted_tokens.inc(self.cache.stats.evicted_tokens - before[1])
                self.metrics.cache_bytes.set(self.cache.bytes)
                self.metrics.cache_tokens.set(self.cache.tokens)

        engine_req = Request(
            req.ids, req.params, req.policy, sequence=seq, prompt_logits=logits, feed_last=req.share_cache,
            on_release=release, request_id=req.request_id, arrival=job.created, constraint=req.constraint, on_admit=lambda: job.sink(Event("admitted")),
            question_ids=req.question_ids,
        )  # fmt: skip
        job.request_id = req.request_id
        job.output = RequestOutput(prompt_tokens=len(req.ids), reused_tokens=reuse, arrival=job.created)
        job.sink(Event("start", cached_tokens=reuse))
        self.engine.add_request(engine_req)
        if job.cancel.is_set():
            self.engine.abort(req.request_id)

    def _seed(self, mem: KVMemory, ns: str, ids: list[int], pieces_of: Pieces | None) -> int:
        """Start a new session with the KV of its first message (a system prompt with the tools, pinned) taken
        from the prefix cache where an earlier request computed it: agent runs over one tool set prefill it once.

        Returns the first message's length in tokens when the session may put its KV back into the cache after
        its request (0: not a pinned first message, or no cache).
        """
        if self.cache.capacity <= 0 or pieces_of is None:
            return 0
        first = pieces_of(0)[:1]
        if not first or not first[0][2] or not 2 <= first[0][1] <= len(ids) - 2:
            return 0
        kind, end, _ = first[0]
        match = self.cache.match(ns, ids[:end])
        if match.length == end:
            self.cache.load(match, mem.seq.cache, end)  # attaches the cached pages: no copy, copy on write after
            mem.seq.tokens = list(ids[:end])
            mem.record(kind, ids[:end], pinned=True)
        return end

    def _admit_memory(self, job: Job, m: MemoryRequest) -> None:
        """Open the job's session, turn its prompt into edits (drops, cuts, compressions, the fit to the
        window) and hand the new tokens to the engine on the session's own sequence."""
        req, llm = job.request, self.llm
        runner = Runner(llm.model, req.policy, llm.engine_config, self.engine.pools)
        try:
            mem, source = self.sessions.open(m.session, runner)
        except LongKVError as exc:
            self._drop_job(job, exc)
            return
        ns = namespace(self._fingerprint, req.kv_key, req.salt)
        try:
            head = self._seed(mem, ns, req.ids, m.pieces) if source == "new" and req.share_cache else 0
            old = max((s.id for s in mem.spans), default=0)  # spans older than this request
            prep = prepare(mem, req.ids, m.drop, m.tool_keep, m.pieces, llm.config.max_position, req.params.max_new_tokens)
        except LongKVError as exc:
            if source == "new":
                self.sessions.forget(m.session)  # a session is made only by a request that ran
            else:
                self.sessions.close(m.session)  # every edit left the session consistent
            self._drop_job(job, exc)
            return
        except Exception as exc:  # a bug mid-edit: the session cannot be trusted
            log.exception("KV memory edit failed")
            self.sessions.forget(m.session)
            self._drop_job(job, exc)
            return
        matched, pieces, edits, new = prep.matched, prep.pieces, prep.edits, prep.new
        base = mem.tokens
        cached = sum(s.kept for s in mem.spans if s.id <= old)  # KV the session held before this request
        prompt = mem.seq.tokens + new
        merge = prep.partial is not None and bool(mem.spans) and mem.spans[-1].id == prep.partial

        def release(seq: Sequence, out: RequestOutput) -> None:  # engine thread, before "done" is dispatched
            saved: int | str | None = None
            try:
                if out.finish_reason in ("stop", "length"):
                    at, extend = matched, merge
                    started: int | None = None  # where the message of the next piece starts (the end of the one before)
                    for kind, end, pin in pieces:
                        if end > at:
                            # a message whose start the session held (a reply rendered anew, its template tail after
                            # the generated tokens) stays one span
                            held = extend or (started is not None and started < at)
                            last = mem.spans[-1] if mem.spans else None
                            mem.record(kind, req.ids[at:end], pin, extend=held and last is not None and last.kind == kind and not last.compressed)
                            at, extend = end, False
                        started = end
                    if m.pieces is None and len(req.ids) > at:  # a completion's prompt is text; what it generates, a reply
                        mem.record("text", req.ids[at:], extend=extend and mem.spans[-1].kind == "text")
                        at, extend = len(req.ids), False
                    generated = req.ids[at:] + seq.tokens[base + len(new) :]
                    if generated:
                        mem.record("assistant", generated, extend=extend and mem.spans[-1].kind == "assistant")
                    if head and mem.spans[0].pinned and mem.seq.tokens[:head] == req.ids[:head]:
                        self.cache.insert(ns, req.ids[:head], mem.seq.cache)  # for the next new sessions
                else:  # cancelled or failed: back to the session before this request
                    seq.cache.truncate(base)
                    del seq.tokens[base:]
                    for lkv in seq.cache.layers:
                        lkv.shrink()
                saved = self.sessions.close(m.session, save=m.save and out.finish_reason in ("stop", "length"))
            except OSError as exc:  # the session is kept in RAM; the reply says the save failed
                log.error("KV memory session %s could not be saved: %s", m.session, exc)
                saved = f"{type(exc).__name__}: {exc}"
            except Exception:
                log.exception("KV memory session %s could not be kept", m.session)
                self.sessions.forget(m.session)
                return
            job.memory_report = {
                "session": m.session, "source": source, "spans": mem.report(), "kv_tokens": mem.tokens,
                "logical_tokens": mem.logical_tokens, "kv_bytes": mem.bytes(), "edits": edits,
                **({"stale_snapshot": self.sessions.stale[m.session]} if m.session in self.sessions.stale else {}),
                **({"saved_bytes": saved} if isinstance(saved, int) else {"save_error": saved} if saved else {}),
            }  # fmt: skip

        engine_req = Request(
            prompt, req.params, req.policy, sequence=mem.seq, prompt_logits=None, on_release=release, keep_sequence=True,
            request_id=req.request_id, arrival=job.created, constraint=req.constraint, on_admit=lambda: job.sink(Event("admitted")),
        )  # fmt: skip
        job.request_id = req.request_id
        job.output = RequestOutput(prompt_tokens=len(prompt), reused_tokens=cached, arrival=job.created)
        job.sink(Event("start", cached_tokens=cached))
        self.engine.add_request(engine_req)
        if job.cancel.is_set():
            self.engine.abort(req.request_id)

    def _drop_job(self, job: Job, exc: BaseException) -> None:
        """End a job that never reached the engine with an error."""
        with self._cv:
            self._jobs.pop(job.request.request_id, None)
        self._finish(job, Event("error", error=exc))

    def _dispatch(self, ev: TokenEvent) -> None:
        job = self._jobs.get(ev.request_id)
        if job is None:
            return
        job.output = ev.output
        if ev.output.first_token and job.last_token_at and ev.token_id is not None and self.metrics is not None:
            self.metrics.inter_token.observe(time.perf_counter() - job.last_token_at)
        if ev.token_id is not None:
            job.last_token_at = time.perf_counter()
        if ev.text:
            job.sink(Event("text", ev.text))
        if not ev.finished:
            return
        with self._cv:
            self._jobs.pop(ev.request_id, None)
        out = ev.output
        if self.metrics is not None:
            self.metrics.observe_output(out)
        if out.finish_reason == "error":
            self._finish(job, Event("error", error=out.error))
        else:
            self._finish(job, Event("done", output=out))

    def _finish(self, job: Job, event: Event) -> None:
        if job.finished:
            return
        job.finished = True
        job.sink(event)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self._waiting))
            self.metrics.running.set(len(self._jobs))
            self.metrics.batch_size.set(self.engine.last_batch_size if self.engine.running else 0)
            self.metrics.active_kv_bytes.set(self.engine.kv_bytes())
            self.metrics.kv_pages_used.set(self.engine.pools.used_pages())
            self.metrics.kv_pages_free.set(self.engine.pools.free_pages())
            self.metrics.kv_pool_bytes.set(self.engine.pools.bytes())
            if threading.current_thread() is self._thread:  # the sessions belong to the engine thread
                compactions = self.engine.pools.compactions()
                self.metrics.kv_compactions.inc(compactions - self._compactions)
                self._compactions = compactions
                self.metrics.memory_sessions.set(len(self.sessions))
                self.metrics.memory_bytes.set(self.sessions.bytes())
                self.metrics.memory_loaded.set(self.sessions.loaded)
