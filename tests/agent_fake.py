"""A scripted OpenAI-compatible chat server for the agent tests: deterministic replies, checked requests.

The script is a function of the request's messages that returns the reply:
``{"content": str, "calls": [(name, arguments_dict_or_raw_str), ...], "cut": (name, raw_text)}`` ("cut": a
call cut off at ``max_tokens``, reported as longkv serve reports it). Every
request is checked as a strict server would: its prompt (counted as 1 token per
4 bytes of the messages' JSON + 200 for the tools) must fit ``window`` less
``max_tokens`` (else HTTP 400, as longkv serve answers an overflow), and every
assistant tool call must be followed by its tool result before any other
message (a KV memory session's history may pass the window: the server fits its
KV). Cached tokens are the common prefix with the previous request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[list[dict[str, Any]]], dict[str, Any]]


def tokens(messages: list[dict[str, Any]]) -> int:
    return len(json.dumps(messages, ensure_ascii=False).encode()) // 4 + 200


def check_pairs(messages: list[dict[str, Any]]) -> str | None:
    """None when every tool call is answered right after its message, else what is wrong."""
    i = 0
    while i < len(messages):
        m = messages[i]
        if m["role"] == "tool":
            return f"a tool message at {i} answers no call"
        if m["role"] == "assistant" and m.get("tool_calls"):
            ids = [c["id"] for c in m["tool_calls"]]
            got = [x.get("tool_call_id") for x in messages[i + 1 : i + 1 + len(ids)]]
            if got != ids:
                return f"the calls {ids} at {i} are followed by {got}"
            i += 1 + len(ids)
            continue
        i += 1
    return None


class FakeServer:
    """Serve ``script`` on a free local port until :meth:`close` (``url`` ends in /v1)."""

    def __init__(self, script: Script, window: int = 32768, delay_s: float = 0.0, report_window: bool = True, longkv: bool = False) -> None:
        self.script = script
        self.window = window
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._prev = ""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                card: dict[str, Any] = {"id": "fake", "object": "model"}
                if report_window:
                    card["max_model_len"] = fake.window
                if longkv:  # says it is longkv serve: the agent then sends its KV memory session
                    card["owned_by"] = "longkv"
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                msgs = body["messages"]
                n = tokens(msgs)
                problem = check_pairs(msgs)
                if problem:
                    fake.errors.append(problem)
                    return self._send(400, {"error": {"message": problem}})
                # a KV memory session holds a longer history than the window (its KV is compressed, stubbed and
                # dropped to fit): its text may pass the window
                if n + body["max_tokens"] > fake.window and not (body.get("longkv") or {}).get("session"):
                    fake.errors.append(f"overflow: {n} + {body['max_tokens']} > {fake.window}")
                    return self._send(400, {"error": {"message": f"prompt of {n} tokens + max_tokens exceeds {fake.window}"}})
                text = json.dumps(msgs, ensure_ascii=False)
                common = 0
                for a, b in zip(text, fake._prev, strict=False):
                    if a != b:
                        break
                    common += 1
                fake._prev = text
                cached = min(n, common // 4 + 200) if common else 0
                time.sleep(fake.delay_s)
                reply = fake.script(msgs)
                calls = [{"id": f"call_{len(fake.requests)}_{i}", "type": "function",
                          "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
                         for i, (name, args) in enumerate(reply.get("calls", []))]  # fmt: skip
                msg: dict[str, Any] = {"role": "assistant", "content": reply.get("content") or None}
                if calls:
                    msg["tool_calls"] = calls
                out: dict[str, Any] = {
                    "id": "x", "object": "chat.completion", "model": "fake",
                    "choices": [{"index": 0, "message": msg,
                                 "finish_reason": "length" if reply.get("cut") else "tool_calls" if calls else "stop"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": 10, "total_tokens": n + 10,
                              "prompt_tokens_details": {"cached_tokens": cached}},
                }  # fmt: skip
                if reply.get("cut"):  # a call cut off at max_tokens, reported as longkv serve does
                    name, raw = reply["cut"]
                    out["longkv"] = {"truncated_tool_call": {"index": 0, "name": name, "arguments": None, "text": raw}}
                if (body.get("longkv") or {}).get("session"):  # a memory report: half the text's tokens as KV, one edit
                    out["longkv"] = {"memory": {"kv_tokens": min(n // 2, fake.window - 1), "logical_tokens": n,
                                                "edits": [{"compress": len(fake.requests), "tokens": 7}]}}  # fmt: skip
                self._send(200, out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tool_results(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


def scripted(calls: list[tuple[str, Any]]) -> Script:
    """A model that makes ``calls`` in order, one per reply, and repeats a call whose result says it was
    interrupted with no file changed (so that a resumed run ends as an uninterrupted one would)."""

    def script(messages: list[dict[str, Any]]) -> dict[str, Any]:
        # a plan call leaves no result in the context: its plan is shown after the task instead
        done = int(calls[0][0] == "plan" and any(str(m.get("content") or "").startswith("Your current plan:") for m in messages))
        for r in tool_results(messages):
            if r.startswith("interrupted") and "Files changed since it started: none" in r:
                continue
            done += 1
        name, args = calls[min(done, len(calls) - 1)]
        return {"calls": [(name, args)]}

    return script
