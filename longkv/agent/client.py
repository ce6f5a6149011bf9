"""The agent's model: any OpenAI-compatible chat server, or a model file served in this process.

:class:`ChatClient` speaks ``/v1/chat/completions`` with ``tools`` over plain
HTTP (stdlib only) and reads the server's context window from ``/v1/models``
(``max_model_len``, as ``longkv serve`` and vLLM report it). :func:`local_server`
starts ``longkv serve``'s app on a free local port in a background thread, so a
run with ``--model FILE`` goes through the same engine, prefix cache and tool
grammar as one against a server.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longkv.errors import LongKVError


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is the raw JSON text it wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Tokens of one model call: prompt (of which ``cached`` came from the server's prefix cache) and completion."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0


@dataclass(frozen=True)
class Reply:
    """The model's answer to one request; ``memory``: what a longkv KV memory session reported (``kv_tokens``,
    ``logical_tokens``, ``edits``, ...; docs/memory.md), else None; ``truncated``: the tool call a longkv server
    saw cut off by ``max_tokens`` (its ``name``, None when the cut came before it, and its raw ``text``)."""

    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    usage: Usage
    seconds: float
    memory: dict[str, Any] | None = None
    truncated: dict[str, Any] | None = None  # a longkv server's call cut off at max_tokens: {"name", "text"}


class ModelError(Exception):
    """The server failed a request (HTTP error, unreachable, or a reply that is not a chat completion)."""


class ChatClient:
    """A chat-completions client for ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    Raises :class:`~longkv.errors.LongKVError` from :meth:`window` when the server
    cannot be reached or reports no window and none was given.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str = "none", timeout_s: float = 600.0,
                 window: int | None = None) -> None:  # fmt: skip
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LongKVError(f"the server URL {base_url!r} is not an http(s) URL: give its API base, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._model = model
        self._window = window

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ModelError(f"HTTP {exc.code} from {self.base_url}{path}: {detail}") from None
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            raise ModelError(f"cannot reach {self.base_url}{path}: {getattr(exc, 'reason', exc)}") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{self.base_url}{path} answered with something that is not JSON ({exc})") from None

    def _models(self) -> list[dict[str, Any]]:
        try:
            return list(self._request("GET", "/models").get("data") or [])
        except ModelError as exc:
            if str(exc).startswith("HTTP 404"):  # a server is there, the API is not: most often the URL lacks /v1
                raise LongKVError(f"{self.base_url}/models is not found (HTTP 404): give the API's base URL, which for "
                                  f"longkv serve, vLLM and llama.cpp ends in /v1 (e.g. {self.base_url}/v1)") from None  # fmt: skip
            raise LongKVError(f"{exc}: start the server (longkv serve --model FILE) or pass --model FILE to run one here") from None

    @property
    def model(self) -> str:
        """The model id sent with each request (the server's first model unless one was given)."""
        if self._model is None:
            models = self._models()
            if not models:
                raise LongKVError(f"{self.base_url}/models lists no model: pass --model-id")
            self._model = str(models[0]["id"])
        return self._model

    def window(self) -> int:
        """The context window in tokens, as the server reports it (``max_model_len`` or ``context_length``).

        Raises:
            LongKVError: the server is unreachable, or reports no window and none was given.
        """
        if self._window is None:
            models = self._models()
            ids = [str(m.get("id")) for m in models]
            if self._model is not None and ids and self._model not in ids:
                raise LongKVError(f"{self.base_url}/models has no model {self._model!r}: it serves {', '.join(ids)}; pass one of them to --model-id")
            for m in models:
                if self._model in (None, m.get("id")):
                    n = m.get("max_model_len") or m.get("context_length") or m.get("context_window")
                    if n:
                        self._window = int(n)
                        break
            if self._window is None:
                raise LongKVError(f"{self.base_url}/models reports no context window for {self.model!r}: pass --context-window TOKENS")
        return self._window

    def is_longkv(self) -> bool:
        """Whether the server is ``longkv serve`` (its ``/v1/models`` says ``owned_by: longkv``): it takes the
        ``longkv`` request extension (KV memory sessions)."""
        return any(m.get("owned_by") == "longkv" for m in self._models())

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any = "auto",
                 temperature: float = 0.0, max_tokens: int = 512, seed: int | None = None,
                 longkv: dict[str, Any] | None = None) -> Reply:  # fmt: skip
        """One chat completion (not streamed), one tool call at most (``parallel_tool_calls: false``: a small model
        otherwise strings many guesses together before it sees a single result). ``longkv``: the request
        extension of ``longkv serve`` (e.g. a KV memory session).

        Raises:
            ModelError: HTTP failure or a body that is not a chat completion.
        """
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "tools": tools, "tool_choice": tool_choice,
            "parallel_tool_calls": False, "temperature": temperature, "max_tokens": max_tokens,
        }  # fmt: skip
        if seed is not None:
            body["seed"] = seed
        if longkv:
            body["longkv"] = longkv
        t0 = time.perf_counter()
        data = self._request("POST", "/chat/completions", body)
        seconds = time.perf_counter() - t0
        try:
            choice = data["choices"][0]
            msg = choice["message"]
            calls = tuple(
                ToolCall(str(c.get("id") or f"call_{i}"), str(c["function"]["name"]), str(c["function"].get("arguments") or "{}"))
                for i, c in enumerate(msg.get("tool_calls") or [])
            )
            u = data.get("usage") or {}
            cached = int(((u.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
            usage = Usage(int(u.get("prompt_tokens") or 0), cached, int(u.get("completion_tokens") or 0))
            ext = data.get("longkv") or {}
            memory, cut = ext.get("memory"), ext.get("truncated_tool_call")
            truncated = {"name": cut.get("name"), "text": str(cut.get("text") or "")} if isinstance(cut, dict) else None
            return Reply(str(msg.get("content") or ""), calls, str(choice.get("finish_reason") or ""), usage, seconds,
                         memory if isinstance(memory, dict) else None, truncated)  # fmt: skip
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"{self.base_url} answered with no chat completion ({type(exc).__name__}: {exc}): {str(data)[:300]}") from None


@dataclass
class LocalServer:
    """``longkv serve``'s app for one model, on 127.0.0.1 in a background thread (:func:`local_server`)."""

    url: str
    model_id: str
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def local_server(
    model: str | None, threads: int | None = None, device: str = "cpu", quiet: bool = True, memory_dir: Path | None = None
) -> LocalServer:
    """Load ``model`` (a .gguf, an HF folder or a hub id; None: the default) and serve it on a free local port.

    ``memory_dir``: where the server saves KV memory sessions (so a resumed run reads its KV back).

    Raises:
        LongKVError: the model cannot be loaded, or the server extra is missing.
    """
    try:
        import uvicorn

        from longkv.engine.llm import LLM
        from longkv.server.app import create_app, default_model_id
        from longkv.server.worker import ServerConfig
    except ImportError as exc:
        raise LongKVError(f"running a model in process needs the server extra ({exc.name} is missing): pip install 'longkv[serve]'") from None
    llm = LLM(model, threads=threads, device=device)
    cfg = ServerConfig(model_id=default_model_id(llm), memory_dir=memory_dir)
    config = uvicorn.Config(create_app(llm, cfg), host="127.0.0.1", port=0, log_level="warning" if quiet else "info")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="longkv-agent-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LongKVError("the in-process server did not start: run longkv serve separately and pass --server")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LocalServer(f"http://127.0.0.1:{port}/v1", cfg.model_id, server, thread)
