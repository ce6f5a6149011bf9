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
from longkv.server.worker import ContextOverflow, QueueFull

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
            text = f"the request body must be one JSON object (got {kind}): send it with Content-Type: application/json"
            return counted(request, error_response(400, text, "invalid_request_error", None, "invalid_json"))

        def field(e: Any) -> str:  # a tagged union's tag (in <>) is not a field
            return ".".join(str(p) for p in e.get("loc", ()) if p != "body" and not str(p).startswith("<"))

        def line(e: Any) -> str:
            msg = str(e.get("msg", "invalid request"))
            return f"{field(e)}: {msg}" if field(e) else msg

        where = field(first)
        text = "; ".join(line(e) for e in errors[:3] or [first])  # every field named, not "1 more"
        if len(errors) > 3:
            text += f" (and {len(errors) - 3} more)"
        return counted(request, error_response(400, text, "invalid_request_error", where or None, "invalid_request"))

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

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull) -> Response:
        return counted(request, error_response(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return counted(request, error_response(500, f"internal error ({type(exc).__name__}): please report it", "server_error"))
