"""OpenAI-style error objects, and the app's exception handlers.

Every error answer is ``{"error": {"message", "type", "param", "code"}}`` (a
context overflow adds ``n_prompt_tokens``, ``n_ctx`` and ``max_tokens``): 400 for
a bad request, malformed JSON and wrong types included; 404 for an unknown model
or route; 405 for a wrong method; 429 with ``Retry-After`` when the queue is full.
A 500 means a bug and is logged with its traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from longkv.errors import LongKVError
from longkv.server.metrics import Metrics
from longkv.server.sessions import SessionBusy
from longkv.server.worker import ContextOverflow, QueueFull, ServerStopping

log = logging.getLogger("longkv.server")


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.extra = status, message, type_, param, code, extra


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """An OpenAI error object. ASCII JSON: a message quoting the request's text stays valid even with lone surrogates."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}
    return Response(json.dumps(body, ensure_ascii=True), status_code=status, headers=headers, media_type="application/json")


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "dict": "an object",
               "list": "a list", "none": "null"}


def _is_branch(part: Any) -> bool:
    """Whether a validation error's location part names a union member (``str``, ``list[int]``, ``TextPart``), not a field."""
    return isinstance(part, str) and (part in _TYPE_WORDS or "[" in part or part[:1].isupper() or part.startswith("<"))


def _type_words(tag: str) -> str:
    """A union member's tag in words: ``list[TextPart]`` -> ``a list of text parts``."""
    if tag in _TYPE_WORDS:
        return _TYPE_WORDS[tag]
    if tag.startswith("list[") and tag.endswith("]"):
        inner = _type_words(tag[5:-1])
        for article in ("a ", "an "):
            if inner.startswith(article):
                return "a list of " + inner[len(article):] + ("s" if not inner.endswith("s") else "")
        return "a list of " + inner
    words = "".join(" " + c.lower() if c.isupper() else c for c in tag).strip()
    return ("an " if words[:1] in "aeiou" else "a ") + words


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words (for an error message)."""
    kinds = [(list, "a JSON array"), (str, "a JSON string"), (bool, "a JSON boolean"), (int, "a JSON number"), (float, "a JSON number")]
    return next((name for t, name in kinds if isinstance(value, t)), "JSON null" if value is None else "no object")


def _path(loc: list[Any]) -> str:
    """A field's path as the server's own errors write it: ``messages[0].content[1].text``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _error_lines(errors: list[Any]) -> list[tuple[str, str]]:
    """(field, one-line message) per field from pydantic's errors, in order; a value that fits no member of a union
    (pydantic reports each member apart) is one line: ``stop: expected a string or a list of strings, got 5``."""
    out: list[tuple[str, str]] = []
    unions: dict[str, tuple[list[str], Any]] = {}
    deep: dict[str, dict[str, list[tuple[str, str]]]] = {}  # union field -> member -> errors inside a value of its type
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        cut = next((i for i, p in enumerate(loc) if _is_branch(p)), None)
        where = _path(loc if cut is None else loc[:cut])
        if cut is None or str(loc[cut]).startswith("<"):  # a tagged union's tag (in <>) is not a field
            where = _path([p for p in loc if not _is_branch(p)])
            msg = str(e.get("msg", "invalid request")).removeprefix("Value error, ")  # a validator's own words
            out.append((where, f"{where}: {msg}" if where else msg))
            continue
        if where not in unions:
            unions[where] = ([], e.get("input"))
            out.append((where, ""))
        tags, _ = unions[where]
        if loc[cut] not in tags:
            tags.append(str(loc[cut]))
        if len(loc) > cut + 1:
            inner = _path([p for p in loc if not _is_branch(p)])
            deep.setdefault(where, {}).setdefault(str(loc[cut]), []).append((inner, f"{inner}: {e.get('msg', 'invalid')}"))
    for i, (where, msg) in enumerate(out):
        if where in unions and not msg:
            tags, value = unions[where]
            inside = deep.get(where, {})
            if len(inside) == 1:  # the value has one member's type and fails inside it: say where
                out[i] = next(iter(inside.values()))[0]
                continue
            words = [_type_words(t) for t in tags]
            expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
            shown = json.dumps(value, ensure_ascii=False, default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            out[i] = (where, f"{where}: expected {expected}, got {shown}")
    return out


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer every error of ``app`` as an OpenAI error object, counting those of the completion endpoints."""
    endpoints = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    def counted(request: Request, response: Response) -> Response:
        """Count an error answer of a completion endpoint in longkv_requests_total."""
        endpoint = endpoints.get(request.url.path)
        if endpoint is not None:
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset): no field to name
            at = first.get("loc", ("body", "?"))[-1]
            ctx = first.get("ctx")
            detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
            text = f"the request body is not valid JSON ({detail} at character {at}): send one JSON object"
            return counted(request, error_response(400, text, "invalid_request_error", None, "invalid_json"))
        if tuple(first.get("loc", ())) == ("body",):  # the body parsed, but is not an object: a list, a form, plain text
            kind = request.headers.get("content-type") or "no content type"
            if "json" in kind.lower():
                text = f"the request body must be one JSON object, got {_json_kind(first.get('input'))}: send {{\"model\": ..., ...}}"
            else:
                text = f"the request body must be one JSON object (got {kind}): send it with Content-Type: application/json"
            return counted(request, error_response(400, text, "invalid_request_error", None, "invalid_json"))
        lines = _error_lines(list(errors) or [first])
        text = "; ".join(msg for _, msg in lines[:3])  # every field named, not "1 more"
        if len(lines) > 3:
            text += f" (and {len(lines) - 3} more)"
        return counted(request, error_response(400, text, "invalid_request_error", lines[0][0] or None, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return counted(request, error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> Response:
        return counted(request, error_response(exc.status, exc.message, exc.type, exc.param, exc.code, **exc.extra))

    @app.exception_handler(ContextOverflow)
    async def _overflow(request: Request, exc: ContextOverflow) -> Response:
        return counted(request, error_response(
            400, str(exc), "invalid_request_error", "messages" if request.url.path.endswith("/chat/completions") else "prompt",
            "context_length_exceeded",
            n_prompt_tokens=exc.n_prompt_tokens, n_ctx=exc.n_ctx, max_tokens=exc.max_tokens,
        ))  # fmt: skip

    @app.exception_handler(SessionBusy)
    async def _session_busy(request: Request, exc: SessionBusy) -> Response:
        return counted(request, error_response(409, str(exc), "invalid_request_error", "longkv.session", "session_busy"))

    @app.exception_handler(LongKVError)
    async def _user(request: Request, exc: LongKVError) -> Response:
        return counted(request, error_response(400, str(exc), "invalid_request_error", code="invalid_request"))

    @app.exception_handler(ServerStopping)
    async def _stopping(request: Request, exc: ServerStopping) -> Response:
        return counted(request, error_response(503, str(exc), "server_error", code="server_shutting_down"))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull) -> Response:
        return counted(request, error_response(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return counted(request, error_response(500, f"internal error ({type(exc).__name__}): please report it", "server_error"))
