"""The FastAPI app: OpenAI HTTP requests in, engine jobs out. Nothing here runs the model.

Each completion request is validated (:mod:`longkv.server.schemas`), rendered
and tokenized (in a worker thread, with the server's own tokenizer copy),
checked against the window and limits (:func:`longkv.server.worker.plan`), queued
on the :class:`~longkv.server.worker.EngineWorker`, and answered from the events
the engine thread sends back: one JSON object, or Server-Sent Events ending
with ``data: [DONE]``. A task watches the connection meanwhile: when the client
goes away the job is cancelled, and the engine stops it within one layer.

Every error is an OpenAI-style object ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (malformed JSON and wrong types included),
404 for an unknown model or route, 429 with ``Retry-After`` when the queue is
full; a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from longkv import __version__
from longkv.engine.grammar import Grammar, GrammarConstraint, grammar_tokenizer
from longkv.engine.llm import LLM
from longkv.errors import LongKVError
from longkv.server.errors import ApiError, error_response, install_error_handlers
from longkv.server.metrics import Metrics
from longkv.server.schemas import (
    AllowedToolsChoice,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    FunctionCall,
    Health,
    ModelCard,
    ModelList,
    NamedToolChoice,
    PromptTokensDetails,
    ToolCall,
    Usage,
)
from longkv.server.sessions import Pieces
from longkv.server.tool_grammar import ReplyPlan, plan_reply
from longkv.server.tool_parser import CallParser, Delta, ParseResult
from longkv.server.tools import WrittenReplies, render_messages, tool_format
from longkv.server.worker import EngineWorker, Event, Job, MemoryRequest, ServerConfig, ServerStopping, plan

log = logging.getLogger("longkv.server")

MIN_TEMPERATURE = 1e-4
GRAMMAR_CACHE = 32  # compiled grammars kept
UNSUPPORTED = {  # request fields (OpenAI's, other servers') that longkv does not honour, with what to send instead
    "functions": "send tools instead",
    "function_call": "send tools instead",
    "repeat_penalty": "send repetition_penalty",
    "n_predict": "send max_tokens",
    "stop_token_ids": "send stop strings",
    "dry_multiplier": 'send "longkv": {"dry_multiplier": ...}',
    "guided_json": "send response_format",
    "guided_choice": "send response_format with an enum schema",
    "json_schema": 'send response_format: {"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}',
    "grammar": "send response_format (a JSON schema) or tools",
    "top_logprobs": "leave it out (logprobs are not supported)",
    "n_probs": "leave it out (logprobs are not supported)",
    **{name: "leave it out" for name in (
        "logit_bias", "best_of", "typical_p", "min_tokens", "mirostat", "tfs_z", "bad_words", "use_beam_search",
        "length_penalty", "guided_regex", "guided_grammar", "xtc_probability", "xtc_threshold", "top_a", "penalize_nl",
        "include_stop_str_in_output", "skip_special_tokens",
    )},
}  # fmt: skip
AS_IS: dict[str, tuple[Any, ...]] = {  # UNSUPPORTED values that ask for what longkv does anyway: accepted
    "functions": ({}, []), "function_call": ({}, []), "logit_bias": ({}, []), "best_of": (1,),
    "skip_special_tokens": (True,), "include_stop_str_in_output": (False,),
}  # fmt: skip
CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (including a prompt beyond the model's window)."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    429: {"model": ErrorResponse, "description": "Too many requests waiting: retry after Retry-After seconds."},
}


def ignored_fields(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """Top-level request fields that longkv does not read (OpenAI's ``store``, ``metadata``, a typo), sorted.

    They are accepted, as OpenAI-compatible servers do, but named back in ``longkv.ignored_fields``
    and logged once, so a misspelt ``max_token`` is not silently dropped.
    """
    checked = {*UNSUPPORTED, *CHAT_ONLY, "response_format"}  # refused when set, so null is all they can be here
    return sorted(name for name in body.model_extra or {} if name not in checked)


class _Tokenizer:
    """The HTTP side's own copy of the tokenizer (the engine thread decodes with the original), behind a lock."""

    def __init__(self, llm: LLM) -> None:
        self._tok = copy.deepcopy(llm.tokenizer)
        self._bos = llm.bos_id
        self._lock = threading.Lock()
        self._grammars: dict[str, Grammar] = {}  # compiled grammars by their text, least recently used first

    def encode(self, text: str) -> list[int]:
        with self._lock:
            try:
                return list(self._tok.encode(text, add_special_tokens=False))
            except Exception as exc:  # e.g. lone surrogates, which JSON allows and the tokenizer refuses
                raise ApiError(400, f"the text could not be tokenized ({type(exc).__name__}): send valid UTF-8 text") from None

    def prompt_ids(self, text: str) -> list[int]:
        """A whole prompt's ids: :meth:`encode` behind the BOS token where the model's tokenizer puts one (Gemma,
        Llama 3), unless the text (a chat template's rendering) starts with it already; as :meth:`LLM.prompt_ids`."""
        ids = self.encode(text)
        if self._bos is not None and (not ids or ids[0] != self._bos):
            ids.insert(0, self._bos)
        return ids

    def grammar(self, lark: str, eos_ids: frozenset[int], vocab_size: int, param: str) -> GrammarConstraint:
        """Compile ``lark`` for this tokenizer (the last few are kept: an agent sends the same tools every turn)
        and start it. The first call builds llguidance's view of the tokenizer (~1 s)."""
        with self._lock:
            grammar = self._grammars.pop(lark, None)
            if grammar is None:
                try:
                    grammar = Grammar(lark, grammar_tokenizer(self._tok, eos_ids, vocab_size), vocab_size)
                except LongKVError as exc:
                    raise ApiError(400, f"{exc}: simplify the schema, or send \"longkv\": {{\"grammar\": false}}", param=param) from None
            self._grammars[lark] = grammar  # most recent last
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.pop(next(iter(self._grammars)))
            return grammar.constraint()

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, generation: bool = True) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions with a plain prompt", param="messages")
        with self._lock:
            try:
                return str(self._tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False))
            except Exception as exc:  # jinja's raise_exception (e.g. roles must alternate) and friends
                raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from None


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    end, limit = 0, min(len(a), len(b))
    while end < limit and a[end] == b[end]:
        end += 1
    return end


def question_text(question: str, text: str, where: str) -> str:
    """``text`` cut before ``question``, which must end it (surrounding whitespace aside).

    Raises:
        ApiError: 400 when the question is blank or does not end ``text``.
    """
    q, text = question.strip(), text.rstrip()
    if not q or not text.endswith(q):
        raise ApiError(
            400, f"longkv.question must be the text that ends {where}: send that closing question (or leave longkv.question out)",
            param="longkv.question",
        )
    return text[: len(text) - len(q)]


SPAN_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def message_pieces(
    tokenizer: _Tokenizer, messages: list[dict[str, Any]], roles: list[str], tools: list[dict[str, Any]] | None, ids: list[int]
) -> Pieces:
    """Where each message of a chat prompt ends in its ids, for a KV memory session's span kinds.

    The end of message ``i`` is how far the rendering of ``messages[:i + 1]`` (without a
    generation prompt) agrees with ``ids``. Rendered from the last message back, only
    as far as the tokens after ``after`` need (the session holds the rest). Messages
    before the first assistant message (system prompt, task) are pinned.
    """

    def pieces(after: int) -> list[tuple[str, int, bool]]:
        first_reply = next((i for i, r in enumerate(roles) if r == "assistant"), len(roles))
        out: list[tuple[str, int, bool]] = []
        for i in range(len(messages), 0, -1):
            end = agreement(tokenizer.prompt_ids(tokenizer.render(messages[:i], tools, generation=False)), ids)
            out.append((SPAN_ROLES.get(roles[i - 1], "text"), end, i - 1 < first_reply))
            if end <= after:
                break
        return out[::-1]

    return pieces


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    """The app for one loaded model. The engine thread starts and stops with the app's lifespan."""
    metrics = Metrics()
    worker = EngineWorker(llm, config, metrics)
    tokenizer = _Tokenizer(llm)
    tool_fmt = tool_format(llm.tokenizer)
    written = WrittenReplies()  # replies whose calls came outside the tags, to render them back as written
    fingerprint = f"longkv-{__version__}-{llm.engine_config.dtype}-{llm.decode_weights}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="longkv", version=__version__, lifespan=lifespan, summary="OpenAI-compatible server with a token-level prefix cache")
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    install_error_handlers(app, metrics)

    # ------------------------------------------------------------------ info
    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=config.model_id, running=worker.running, queued=worker.queued, cache_tokens=worker.cache.tokens, cache_bytes=worker.cache.bytes)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def card() -> ModelCard:
        return ModelCard(id=config.model_id, created=int(app.state.started), max_model_len=llm.config.max_position)

    app.state.started = time.time()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: ERRORS[404]})
    async def get_model(model_id: str) -> ModelCard:
        if model_id != config.model_id:
            raise ApiError(404, f"model {model_id!r} not found: this server serves {config.model_id!r}", "not_found_error", "model", "model_not_found")
        return card()

    # ------------------------------------------------------------------ completions
    warned: set[str] = set()

    def check(body: ChatCompletionRequest | CompletionRequest) -> None:
        if body.model != config.model_id:
            raise ApiError(404, f"model {body.model!r} not found: this server serves {config.model_id!r}", "not_found_error", "model", "model_not_found")
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported: send one request per completion", param="n")
        if body.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported: leave them out", param="logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported: leave it out or send 0", param=name)
        extra = body.model_extra or {}
        for name, hint in UNSUPPORTED.items():
            if extra.get(name) is not None and extra[name] not in AS_IS.get(name, ()):
                raise ApiError(400, f"{name} is not supported by longkv serve: {hint}", param=name)
        ext = body.longkv
        if body.top_k is not None and ext is not None and ext.top_k and max(body.top_k, 0) != ext.top_k:
            raise ApiError(400, f"top_k {body.top_k} and longkv.top_k {ext.top_k} differ: send one of them", param="top_k")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        for name in CHAT_ONLY:
            if extra.get(name) is not None:
                raise ApiError(400, f"{name} belongs to /v1/chat/completions: send the conversation there", param=name)
        if extra.get("response_format") not in (None, {"type": "text"}):
            raise ApiError(400, "response_format belongs to /v1/chat/completions: send the conversation there", param="response_format")
        new = [name for name in ignored_fields(body) if name not in warned]
        if new:  # once per field name, as the response's longkv.ignored_fields names them every time
            warned.update(new)
            log.warning("request fields ignored (not part of the API longkv serves): %s", ", ".join(new))
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop")

    def sampling(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        ext = body.longkv
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow: that close to 0 is greedy anyway
            temperature = 0.0
        top_p = 1.0 if body.top_p is None else body.top_p
        if top_p == 0.0:  # OpenAI's top_p=0 keeps the single most likely token: greedy
            temperature, top_p = 0.0, 1.0
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": max(body.top_k, 0) if body.top_k is not None else ext.top_k if ext else 0,
            "min_p": body.min_p or 0.0,
            "repetition_penalty": body.repetition_penalty or 1.0,
            "seed": None if body.seed == -1 else body.seed,
            "stop": tuple(s for s in stops if s),
            "ignore_eos": bool(body.ignore_eos or (ext and ext.ignore_eos)),
            "dry_multiplier": ext.dry_multiplier if ext else 0.0,
        }

    def memory_request(body: ChatCompletionRequest | CompletionRequest, pieces: Pieces | None = None) -> MemoryRequest | None:
        ext = body.longkv
        if ext is None or ext.memory is None:
            return None
        if ext.session is None:
            raise ApiError(400, 'longkv.memory needs a session: send "longkv": {"session": "ID", "memory": {}}', param="longkv.session")
        if ext.memory.save and config.memory_dir is None:
            raise ApiError(400, "this server has no memory folder: start it with --memory-dir DIR to save sessions", param="longkv.memory.save")
        m = ext.memory
        return MemoryRequest(ext.session, m.tool_keep, list(m.drop), m.save, pieces)

    async def submit(
        body: ChatCompletionRequest | CompletionRequest, ids: list[int], max_tokens: int | None, constraint: GrammarConstraint | None = None,
        memory: MemoryRequest | None = None, question_ids: list[int] | None = None,
    ) -> tuple[Job, asyncio.Queue[Event]]:
        ext = body.longkv
        req = plan(
            llm, config, ids, max_tokens, sampling(body),
            policy=ext.policy if ext else None, budget=ext.budget if ext else None,
            session=ext.session if ext else None, share_cache=ext.cache if ext else True,
            salt=ext.cache_salt if ext else None, constraint=constraint, memory=memory, question_ids=question_ids,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        return worker.submit(req, sink), events

    async def watch_disconnect(request: Request, job: Job) -> None:
        """Cancel ``job`` as soon as the client goes away."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not job.finished:
                    worker.cancel(job)
                return

    def longkv_report(body: ChatCompletionRequest | CompletionRequest, job: Job, report: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The response's ``longkv`` object: the tool report, the session's memory, the fields the request sent in vain."""
        out = dict(report or {})
        if job.memory_report is not None:
            out["memory"] = job.memory_report
        ignored = ignored_fields(body)
        if ignored:
            out["ignored_fields"] = ignored
        return out or None

    def usage(turn: Any, cached: int) -> Usage:
        return Usage(
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=len(turn.token_ids),
            total_tokens=turn.prompt_tokens + len(turn.token_ids),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def tool_report(reply: ReplyPlan | None, turn: Any, result: ParseResult | None) -> tuple[str, dict[str, Any] | None]:
        """The finish reason of a chat reply and its ``longkv`` report (with tools or a response format)."""
        reason = "stop" if turn.finish_reason == "stop" else "length"
        if result is not None and result.calls and reason == "stop":
            reason = "tool_calls"
        if reply is None or (not reply.schemas and reply.answer_schema is None):
            return reason, None
        report: dict[str, Any] = {
            "grammar": reply.grammar is not None,
            "mask_ms_per_token": round(turn.mask_s / turn.masks * 1e3, 4) if turn.masks else 0.0,
            "mask_compute_ms_per_token": round(turn.mask_compute_s / turn.masks * 1e3, 4) if turn.masks else 0.0,
        }
        if result is not None:
            if reply.choice == "required" and not result.calls and result.truncated is None:  # possible with the grammar off
                result.errors.append({"index": 0, "error": "tool_choice asked for a call and the reply holds none", "text": result.content or ""})
            report.update(tool_call_errors=result.errors, truncated_tool_call=result.truncated, recovered_tool_calls=result.recovered)
            metrics.tool_calls.labels("parsed").inc(len(result.calls) - result.recovered)
            metrics.tool_calls.labels("recovered").inc(result.recovered)
            metrics.tool_calls.labels("invalid").inc(len(result.errors))
            metrics.tool_calls.labels("truncated").inc(int(result.truncated is not None))
            if result.recovered and not result.errors and result.truncated is None:
                written.remember(result.text, [(c.id, c.name, json.loads(c.arguments)) for c in result.calls])
        metrics.grammar_mask_seconds.inc(turn.mask_s)
        metrics.grammar_compute_seconds.inc(turn.mask_compute_s)
        metrics.grammar_masks.inc(turn.masks)
        return reason, report

    async def respond(
        request: Request, body: ChatCompletionRequest | CompletionRequest, job: Job, events: asyncio.Queue[Event], chat: bool, reply: ReplyPlan | None = None
    ) -> Any:
        endpoint = "chat" if chat else "completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        parser = reply.parser() if reply is not None else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = await admission(request, job, events)
            gen = stream_events(request, body, job, events, head, rid, created, chat, include_usage, endpoint, reply, parser)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(watch_disconnect(request, job))
        pieces: list[str] = []
        cached = 0
        try:
            while True:
                ev = await events.get()
                if ev.kind == "start":
                    cached = ev.cached_tokens
                elif ev.kind == "text":
                    pieces.append(ev.text)
                elif ev.kind == "error":
                    raise ev.error or RuntimeError("generation failed")  # a LongKVError is a 400, anything else a 500
                elif ev.kind == "done":
                    break
        finally:
            watcher.cancel()
            if not job.finished:
                worker.cancel(job)
        turn = ev.output
        assert turn is not None
        if turn.finish_reason == "cancelled":
            metrics.requests.labels(endpoint, "499").inc()
            return error_response(503, "the generation was cancelled (client gone or server stopping)", "server_error", code="cancelled")
        metrics.requests.labels(endpoint, "200").inc()
        text = "".join(pieces)
        reason: Literal["stop", "length"] = "stop" if turn.finish_reason == "stop" else "length"
        if chat:
            result = None
            if parser is not None:
                parser.feed(text)
                parser.finish(truncated=turn.finish_reason == "length")
                result = parser.result
            chat_reason, report = tool_report(reply, turn, result)
            report = longkv_report(body, job, report)
            message = AssistantMessage(content=text)
            if result is not None:
                calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in result.calls]
                message = AssistantMessage(content=result.content, tool_calls=calls or None)
            return ChatCompletion(
                id=rid, created=created, model=config.model_id, system_fingerprint=fingerprint,
                choices=[ChatChoice(message=message, finish_reason=chat_reason)], usage=usage(turn, cached), longkv=report,  # type: ignore[arg-type]
            )  # fmt: skip
        return Completion(
            id=rid, created=created, model=config.model_id, system_fingerprint=fingerprint,
            choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage(turn, cached),
            longkv=longkv_report(body, job),
        )  # fmt: skip

    async def admission(request: Request, job: Job, events: asyncio.Queue[Event]) -> list[Event]:
        """A stream's events until the engine admits its request: the headers wait for that, so a request the
        engine refuses (more KV than its budget) is a 400 with the reason, not a 200 stream with an error in it."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        head: list[Event] = []
        try:
            while True:
                ev = await events.get()
                if ev.kind == "error":
                    raise ev.error or RuntimeError("generation failed")  # a LongKVError is a 400, anything else a 500
                head.append(ev)
                if ev.kind in ("admitted", "text", "done"):
                    return head
        except BaseException:
            if not job.finished:
                worker.cancel(job)
            raise
        finally:
            watcher.cancel()

    def delta_of(d: Delta) -> dict[str, Any]:
        """One parser delta as an OpenAI chunk delta."""
        if d.content is not None:
            return {"content": d.content}
        if d.name is not None:
            call = {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments or ""}}
            return {"tool_calls": [call]}
        return {"tool_calls": [{"index": d.index, "function": {"arguments": d.arguments}}]}

    async def stream_events(
        request: Request, body: ChatCompletionRequest | CompletionRequest, job: Job, events: asyncio.Queue[Event], head: list[Event],
        rid: str, created: int, chat: bool, include_usage: bool, endpoint: str, reply: ReplyPlan | None = None,
        parser: CallParser | None = None,
    ) -> AsyncIterator[str]:  # fmt: skip
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": config.model_id, "system_fingerprint": fingerprint}

        def chunk(delta: dict[str, Any] | None = None, text: str | None = None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

        watcher = asyncio.create_task(watch_disconnect(request, job))
        cached = 0
        pending = collections.deque(head)  # what came before the headers
        try:
            while True:
                ev = pending.popleft() if pending else await events.get()
                if ev.kind == "start":
                    cached = ev.cached_tokens
                    if chat:
                        yield chunk({"role": "assistant", "content": ""})
                elif ev.kind == "text":
                    if parser is None:
                        yield chunk({"content": ev.text}, ev.text)
                    else:
                        for d in parser.feed(ev.text):
                            yield chunk(delta_of(d))
                elif ev.kind == "error":
                    if isinstance(ev.error, LongKVError):  # the request's own fault (e.g. more KV than the budget)
                        metrics.requests.labels(endpoint, "400").inc()
                        err = {"message": str(ev.error), "type": "invalid_request_error", "param": None, "code": "invalid_request"}
                    elif isinstance(ev.error, ServerStopping):
                        metrics.requests.labels(endpoint, "503").inc()
                        err = {"message": str(ev.error), "type": "server_error", "param": None, "code": "server_shutting_down"}
                    else:
                        metrics.requests.labels(endpoint, "500").inc()
                        err = {"message": f"internal error ({type(ev.error).__name__}): please report it", "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                elif ev.kind == "done":
                    turn = ev.output
                    assert turn is not None
                    if turn.finish_reason == "cancelled":
                        metrics.requests.labels(endpoint, "499").inc()
                        return
                    metrics.requests.labels(endpoint, "200").inc()
                    if not chat:
                        report = longkv_report(body, job)
                        yield chunk({}, "", turn.finish_reason, **({"longkv": report} if report else {}))
                    else:
                        if parser is not None:
                            for d in parser.finish(truncated=turn.finish_reason == "length"):
                                yield chunk(delta_of(d))
                        reason, report = tool_report(reply, turn, parser.result if parser is not None else None)
                        report = longkv_report(body, job, report)
                        extra: dict[str, Any] = {"longkv": report} if report is not None else {}
                        yield chunk({}, None, reason, **extra)
                    if include_usage:
                        u = usage(turn, cached).model_dump()
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': u})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            watcher.cancel()
            if not job.finished:
                worker.cancel(job)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check(body)
        ext = body.longkv
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, (NamedToolChoice, AllowedToolsChoice)) else body.tool_choice
        reply = plan_reply(
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None, choice, body.parallel_tool_calls,
            body.response_format.model_dump(by_alias=True) if body.response_format else None, ext.grammar if ext else True, tool_fmt,
        )  # fmt: skip
        messages: list[dict[str, Any]] = []
        calls: list[str] | None = None  # after an assistant message: the ids of its calls (maybe none)
        for i, m in enumerate(body.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise ApiError(400, f"messages[{i}] is a tool message without tool_call_id: send the id of the call it answers "
                               "(the assistant message's tool_calls[j].id)", param=f"messages[{i}].tool_call_id")  # fmt: skip
            if m.role == "tool" and (calls is None or (calls and m.tool_call_id not in calls)):
                made = f"the assistant message before it made {', '.join(map(repr, calls))}" if calls else "no assistant message comes before it"
                raise ApiError(400, f"messages[{i}] is a tool message answering {m.tool_call_id!r}, but {made}: a tool message follows "
                               "the assistant message that made the call and names its id", param=f"messages[{i}].tool_call_id")  # fmt: skip
            if m.role != "tool":
                calls = [c.id for c in m.tool_calls or []] if m.role == "assistant" else None
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        if not any(m["content"] or m.get("tool_calls") for m in messages):
            raise ApiError(400, "every message is empty: send some content", param="messages")
        rendered, template_tools = render_messages(messages, reply.tools, tool_fmt, written)
        ids = await run_in_threadpool(lambda: tokenizer.prompt_ids(tokenizer.render(rendered, template_tools)))
        # a template without tool support gets tool results as user messages (server.tools): still tool spans
        roles = ["tool" if m["role"] == "user" and m["content"].startswith("<tool_response>") else m["role"] for m in rendered]
        memory = memory_request(body, message_pieces(tokenizer, rendered, roles, template_tools, ids))
        question_ids = None
        if ext is not None and ext.question is not None:  # the prompt's tokens from the question on
            last = rendered[-1]
            if last["role"] != "user":
                raise ApiError(400, "longkv.question needs a conversation that ends with a user message: ask it there", param="longkv.question")
            cut = [*rendered[:-1], {**last, "content": question_text(ext.question, last["content"], "the last user message")}]
            before = await run_in_threadpool(lambda: tokenizer.prompt_ids(tokenizer.render(cut, template_tools)))
            question_ids = ids[agreement(before, ids) :]
        constraint = None
        if reply.grammar is not None:
            param = "tools" if reply.calls else "response_format"
            lark = reply.grammar
            constraint = await run_in_threadpool(lambda: tokenizer.grammar(lark, llm.eos_ids, llm.config.vocab_size, param))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job, events = await submit(body, ids, max_tokens, constraint, memory, question_ids)
        return await respond(request, body, job, events, chat=True, reply=reply)

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check(body)
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported: leave them out", param="echo" if body.echo else "suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}: send them one at a time", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty: send some text", param="prompt")
            ids = await run_in_threadpool(tokenizer.prompt_ids, prompt)
        else:
            ids = [int(t) for t in prompt]
        question_ids = None
        if body.longkv is not None and body.longkv.question is not None:
            if not isinstance(prompt, str):
                raise ApiError(400, "longkv.question needs a text prompt, not token ids: send the prompt as text", param="longkv.question")
            before = await run_in_threadpool(tokenizer.prompt_ids, question_text(body.longkv.question, prompt, "the prompt"))
            question_ids = ids[agreement(before, ids) :]
        job, events = await submit(body, ids, body.max_tokens, memory=memory_request(body), question_ids=question_ids)
        return await respond(request, body, job, events, chat=False)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated schema, with the served model id as the example of every ``model`` field."""
        schema = default_openapi()
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
            if "model" in props:
                props["model"]["examples"] = [config.model_id]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def default_model_id(llm: LLM) -> str:
    """The id served for a model: its file or folder name without extension."""
    from pathlib import Path

    p = Path(llm.source)
    return p.stem if p.suffix == ".gguf" else p.name


def serve(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "bfloat16",
    served_model_name: str | None = None,
    log_level: str = "info",
    chunk_size: int = 512,
    threads: int | None = None,
    weights: str = "auto",
    device: str = "cpu",
    shutdown_timeout: float = 5.0,
    **config: Any,
) -> None:
    """Load ``model`` and serve it until interrupted (``config``: :class:`ServerConfig` fields).

    On SIGTERM or Ctrl-C the server stops taking connections and ends queued requests (503); running requests go on
    for ``shutdown_timeout`` seconds, then end with an error their clients can read (a stream: an error event), and
    it exits.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # the first signal: queued requests end now, running ones after a grace period
                app.state.worker.drain("the server is shutting down")
                timer = threading.Timer(shutdown_timeout, app.state.worker.end_all, args=("the server is shutting down",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    _check_port_free(host, port)  # before the model loads: a busy port is a one-line error, not errno 98 later
    policy = config.get("default_policy", "dense")
    t0 = time.perf_counter()
    print(f"loading {model or 'the default model'} ...", file=sys.stderr, flush=True)  # a large file takes a while: say so
    llm = LLM(model, policy=policy, dtype=dtype, chunk_size=chunk_size, threads=threads, weights=weights, device=device)  # a bad policy fails before loading
    cfg = ServerConfig(model_id=served_model_name or default_model_id(llm), **config)
    if cfg.default_policy != "auto":
        llm.resolve_policy(0, cfg.default_policy)  # knobs that cannot work with this model: fail now, not per request
    app = create_app(llm, cfg)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; serving {llm.source} as {cfg.model_id!r} on http://{host}:{port}/v1",
          file=sys.stderr, flush=True)  # fmt: skip
    # uvicorn cancels what is left a little after the requests ended themselves
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(shutdown_timeout) + 3)).run()


def _check_port_free(host: str, port: int) -> None:
    """Raise :class:`LongKVError` when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LongKVError(f"cannot resolve --host {host!r} ({exc.strerror}): pass an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT leftovers are fine
        try:
            probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LongKVError(f"port {port} on {host} is in use (another server?): stop it or pass another --port") from None
            raise LongKVError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host and --port") from None
