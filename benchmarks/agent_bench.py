"""Agent runtimes side by side: the offline task suite through three agents on one server.

Each task of ``benchmarks/agent_tasks/`` (a short instruction, a folder of files, a
deterministic checker) is given to each agent runtime ("arm"), all of them talking to the
same ``longkv serve``:

    longkv serve --model "$(../shared/models/get-model qwen2.5-coder-1.5b)" --port 8000 &
    python benchmarks/agent_bench.py --server http://127.0.0.1:8000/v1 --model-id qwen2.5-coder-1.5b \\
        --arms longkv,smolagents,mini-swe-agent --max-steps 15 \\
        --out benchmarks/results/agents/qwen2.5-coder-1.5b.json

    python benchmarks/agent_bench.py --list                       # the tasks, their kinds and checks
    python benchmarks/agent_bench.py --report A.json B.json --out AB.json   # runs merged (B's replace A's), tables
    python benchmarks/agent_bench.py ... --tasks 01,09,17 --max-steps 4 --keep /tmp/agent-runs

How a run goes, for each (arm, task):

1. the task's ``files/`` are copied to a fresh temporary workdir;
2. the arm runs in a subprocess with the workdir as its working directory, on the text of
   ``task.md`` (the same text for every arm), with the same step limit;
3. ``check.py WORKDIR ANSWER_FILE`` decides whether the task is solved (ANSWER_FILE holds the
   arm's final answer text). The checker runs even when the arm crashed or timed out: the
   workdir is what counts.

Tokens are measured the same way for every arm: the arms reach the server through a small
recording reverse proxy run by this script (one URL per run, ``/r/RUN/v1``), which reads
``usage.prompt_tokens``, ``usage.prompt_tokens_details.cached_tokens`` and
``usage.completion_tokens`` from each response. "Steps" are the model calls the proxy saw.
The proxy also sets ``temperature`` on every request (``--temperature``, default 0: greedy for
all arms; ``--temperature keep`` leaves each arm's own setting) and, with ``--max-tokens N``,
caps every request's ``max_tokens`` at N. Streamed responses are buffered (delivered whole)
and their usage read from the last chunk, if the client asked for it. With ``--keep DIR``,
each run's workdir, output, answer and every request and response (``calls.jsonl``) are kept
under DIR/ARM/TASK.

Arms:

* ``longkv``: ``longkv agent run --workdir DIR --server URL --model-id ID --max-steps N --json -- TASK``
  (``--model ID`` where the CLI has no ``--model-id``; ``--longkv-args`` adds options, e.g.
  ``--no-sandbox``), which prints one JSON object (run, status, answer, steps, prompt_tokens,
  cached_tokens, completion_tokens, seconds, stop_reason), kept in each run's ``reported``;
* ``smolagents``: smolagents' ``ToolCallingAgent`` (OpenAI tool calls) with an
  ``OpenAIServerModel`` (``parallel_tool_calls=False``) and three tools, ``bash``, ``read_file``
  and ``write_file``, working in the workdir (plus smolagents' own ``final_answer``);
  ``max_steps`` = the step limit (past it, smolagents makes one more call, without tools, for a
  final answer);
* ``smolagents-code``: the same tools with smolagents' ``CodeAgent`` (``code_block_tags="markdown"``:
  the model writes Python in a fenced block that calls the tools; it runs in the worker process);
* ``mini-swe-agent``: mini-swe-agent's ``DefaultAgent`` with the config of its ``mini`` command
  (``mini.yaml``: one ``bash`` tool, the task must end with
  ``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``), model ``openai/ID`` through litellm with
  ``api_base`` = the proxy, cost tracking off, ``step_limit`` = the step limit;
  ``--mini-config mini_textbased.yaml`` switches to its text-based protocol (a fenced bash block).

An arm whose runtime is not installed is skipped with a message. Install the competitors with
``pip install -e '.[agents]'``.

Reported per arm: success rate (and per task kind), mean steps, prompt tokens, the share of
prompt tokens served from the prefix cache (over all calls, and over steady-state calls: every
call after the first of a task), completion tokens, wall time, crashes (an exception, a
non-zero exit without a result, or ``--task-timeout``), and model calls the server answered
with an HTTP error (the arm may retry them; they count as steps). The JSON (``--out``,
rewritten after every run) holds every run with its per-call token counts.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "agent_tasks"
ARMS = ("longkv", "smolagents", "smolagents-code", "mini-swe-agent")
OUTPUT_LIMIT = 10_000  # characters of a tool's output shown to the model (mini-swe-agent's own limit)
COMMAND_TIMEOUT = 30  # seconds per bash command (mini-swe-agent's default)


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One folder of benchmarks/agent_tasks/."""

    id: str  # "01"
    name: str  # "01-rename-function"
    path: Path
    kind: str  # edit | data | bugfix | lookup
    checks: str
    text: str  # task.md, given to the agent as is


def load_tasks(select: str | None = None) -> list[Task]:
    """The tasks, in order; ``select``: comma-separated ids or names ("01,09,17-last-n")."""
    tasks = []
    for path in sorted(p for p in TASKS_DIR.iterdir() if p.is_dir() and p.name[:2].isdigit()):
        meta = json.loads((path / "meta.json").read_text())
        tasks.append(Task(path.name[:2], path.name, path, meta["kind"], meta["checks"], (path / "task.md").read_text().strip()))
    if select:
        wanted = {s.strip() for s in select.split(",") if s.strip()}
        unknown = wanted - {t.id for t in tasks} - {t.name for t in tasks}
        if unknown:
            sys.exit(f"unknown task(s): {', '.join(sorted(unknown))} (see --list)")
        tasks = [t for t in tasks if t.id in wanted or t.name in wanted]
    return tasks


def run_checker(task: Task, workdir: Path, answer_file: Path) -> tuple[bool, str]:
    """(solved, the checker's message)."""
    try:
        proc = subprocess.run([sys.executable, str(task.path / "check.py"), str(workdir), str(answer_file)],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "checker timed out"
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-2000:]


# ----------------------------------------------------------------------------- the recording proxy


HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}


def _usage_of(body: bytes, content_type: str) -> tuple[dict[str, Any] | None, str | None]:
    """(usage, finish_reason) of a JSON or Server-Sent-Events response body."""
    objs: list[dict[str, Any]] = []
    text = body.decode("utf-8", errors="replace")
    if "event-stream" in content_type:
        for line in text.splitlines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                with contextlib.suppress(json.JSONDecodeError):
                    objs.append(json.loads(line[5:]))
    else:
        try:
            objs.append(json.loads(text))
        except json.JSONDecodeError:
            return None, None
    usage, finish = None, None
    for obj in objs:
        if isinstance(obj, dict):
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                finish = choice.get("finish_reason") or finish
    return usage, finish


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed at its timeout is no news
            super().handle_error(request, client_address)


class RecordingProxy:
    """A reverse proxy to the server, in a thread of this process, that records token usage.

    A client of run R uses ``proxy.base_url(R)`` (``http://127.0.0.1:PORT/r/R/v1``) as its
    OpenAI base URL; ``/r/R/v1/X`` is forwarded to ``SERVER/X`` and each completion request's
    usage is recorded under R.
    """

    def __init__(self, server: str, *, temperature: float | None = None, max_tokens: int | None = None,
                 timeout: float = 600, keep_bodies: bool = False) -> None:
        url = urllib.parse.urlsplit(server.rstrip("/"))
        self.host, self.port, self.prefix = url.hostname or "127.0.0.1", url.port or 80, url.path  # prefix: "/v1"
        self.temperature, self.max_tokens, self.timeout, self.keep_bodies = temperature, max_tokens, timeout, keep_bodies
        self.calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)  # with keep_bodies: each request and response
        self.active: dict[str, set[http.client.HTTPConnection]] = defaultdict(set)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def base_url(self, run_id: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/r/{run_id}/v1"

    def calls_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.calls.get(run_id, []))

    def bodies_of(self, run_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return self.bodies.pop(run_id, [])

    def cancel(self, run_id: str) -> None:
        """Close the server connections of a run's requests in flight (the server then cancels them)."""
        with self.lock:
            conns = list(self.active.get(run_id, ()))
        for conn in conns:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # let the handlers record what they got
            with self.lock:
                if not self.active.get(run_id):
                    return
            time.sleep(0.05)

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        parts = h.path.split("/", 4)  # ["", "r", RUN, "v1", rest]
        if len(parts) < 4 or parts[1] != "r" or parts[3] != "v1":
            h.send_error(404, "use /r/RUN/v1/...")
            return
        run_id, rest = parts[2], "/" + (parts[4] if len(parts) > 4 else "")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        is_completion = h.command == "POST" and rest.split("?")[0].rstrip("/").endswith("completions")
        req: Any = None
        if is_completion:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                req = json.loads(body)
        if isinstance(req, dict) and (self.temperature is not None or self.max_tokens is not None):
            if self.temperature is not None:
                req["temperature"] = self.temperature
            if self.max_tokens is not None:
                for key in ("max_tokens", "max_completion_tokens"):
                    if req.get(key) is not None:
                        req[key] = min(int(req[key]), self.max_tokens)
                if req.get("max_tokens") is None and req.get("max_completion_tokens") is None:
                    req["max_tokens"] = self.max_tokens
            body = json.dumps(req).encode()
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        with self.lock:
            self.active[run_id].add(conn)
        try:
            conn.request(h.command, self.prefix + rest, body=body if h.command == "POST" else None, headers=headers)
            resp = conn.getresponse()
            data, status = resp.read(), resp.status
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        except (OSError, http.client.HTTPException) as e:
            data, status = json.dumps({"error": {"message": f"proxy: no answer from the server: {e!r}"}}).encode(), 502
            resp_headers = [("Content-Type", "application/json")]
        finally:
            conn.close()
            with self.lock:
                self.active[run_id].discard(conn)
        seconds = time.perf_counter() - t0
        if is_completion:
            ctype = next((v for k, v in resp_headers if k.lower() == "content-type"), "")
            usage, finish = _usage_of(data, ctype) if status == 200 else (None, None)
            usage = usage or {}
            record = {
                "status": status,
                "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "seconds": round(seconds, 3),
                "finish_reason": finish,
                "stream": "event-stream" in ctype,
            }
            if status != 200:
                record["error"] = data.decode("utf-8", errors="replace")[:500]
            with self.lock:
                self.calls[run_id].append(record)
                if self.keep_bodies:
                    self.bodies[run_id].append({"request": req, "status": status,
                                                "response": data.decode("utf-8", errors="replace")})
        try:
            h.send_response(status)
            for k, v in resp_headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a run killed at its timeout)


# ----------------------------------------------------------------------------- arms, parent side


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _longkv_exe() -> list[str]:
    exe = _venv_bin() / "longkv"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "longkv"]


_LONGKV_HELP: dict[str, str] = {}


def _longkv_help() -> str:
    """``longkv agent run --help`` (cached); raises when the command is missing."""
    if "text" not in _LONGKV_HELP:
        proc = subprocess.run([*_longkv_exe(), "agent", "run", "--help"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"})
        if proc.returncode != 0:
            raise RuntimeError("`longkv agent run` is not available in this longkv (no agent runtime)")
        _LONGKV_HELP["text"] = proc.stdout
    return _LONGKV_HELP["text"]


def arm_missing(arm: str) -> str | None:
    """Why ``arm`` cannot run here, or None."""
    if arm == "longkv":
        try:
            _longkv_help()
        except (OSError, subprocess.TimeoutExpired, RuntimeError) as e:
            return str(e)
        return None
    module = {"smolagents": "smolagents", "smolagents-code": "smolagents", "mini-swe-agent": "minisweagent"}[arm]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[agents]')"
    return None


def _env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"  # `python` in the agents' shells is this one
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(MSWEA_SILENT_STARTUP="1", MSWEA_COST_TRACKING="ignore_errors", MSWEA_GLOBAL_CONFIG_DIR=str(run_dir / "mswea"),
               MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT="2", LITELLM_LOCAL_MODEL_COST_MAP="True", OPENAI_API_KEY="none")
    return env


def arm_command(arm: str, task: Task, workdir: Path, base_url: str, model_id: str, max_steps: int, run_dir: Path,
                extra_args: list[str], mini_config: str = "mini.yaml") -> list[str]:
    """The command line of one run: the longkv CLI, or this script's worker for a competitor."""
    if arm == "longkv":
        # with --server, the model id goes in --model-id where the CLI has it (--model then names a local file)
        model_flag = "--model-id" if "--model-id" in _longkv_help() else "--model"
        return [*_longkv_exe(), "agent", "run", "--workdir", str(workdir), "--server", base_url,
                model_flag, model_id, "--max-steps", str(max_steps), "--json", *extra_args, "--", task.text]
    spec = {"arm": arm, "task": task.text, "workdir": str(workdir), "base_url": base_url, "model_id": model_id,
            "max_steps": max_steps, "result": str(run_dir / "result.json"), "mini_config": mini_config}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    return [sys.executable, str(Path(__file__).resolve()), "_worker", str(run_dir / "spec.json")]


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def run_one(arm: str, task: Task, proxy: RecordingProxy, model_id: str, max_steps: int, timeout: float,
            keep: Path | None, longkv_args: list[str], mini_config: str = "mini.yaml") -> dict[str, Any]:
    """One (arm, task) run: a fresh workdir, the arm in a subprocess, the checker."""
    run_id = f"{arm}.{task.id}.{os.getpid()}.{time.monotonic_ns()}"
    with tempfile.TemporaryDirectory(prefix=f"agent-{arm}-{task.id}-", ignore_cleanup_errors=True) as tmp:
        run_dir = Path(tmp)
        workdir = run_dir / "work"
        shutil.copytree(task.path / "files", workdir)
        cmd = arm_command(arm, task, workdir, proxy.base_url(run_id), model_id, max_steps, run_dir,
                          longkv_args if arm == "longkv" else [], mini_config)
        crashed, error, out, err, rc = False, None, "", "", None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=_env(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proxy.cancel(run_id)
            out, err = proc.communicate()
            crashed, error = True, f"timeout after {timeout:.0f} s"
        seconds = time.perf_counter() - t0

        result: dict[str, Any] = {}
        if arm == "longkv":
            result = _parse_json_stdout(out)
            if not crashed and not result:
                crashed, error = True, f"exit {rc}, no JSON result on stdout: {_tail(err or out)}"
            reported = {k: result.get(k) for k in ("run", "steps", "prompt_tokens", "cached_tokens", "completion_tokens", "seconds")}
        else:
            path = run_dir / "result.json"
            result = json.loads(path.read_text()) if path.is_file() else {}
            if not crashed and (rc != 0 or not result or result.get("error")):
                crashed, error = True, result.get("error") or f"exit {rc}: {_tail(err)}"
            reported = result.get("reported") or {}
        answer = str(result.get("answer") or "")
        answer_file = run_dir / "final_answer.txt"
        answer_file.write_text(answer, encoding="utf-8")
        solved, check_msg = run_checker(task, workdir, answer_file)
        if keep is not None:
            dest = keep / arm / task.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("mswea"))
            (dest / "stdout.txt").write_text(out)
            (dest / "stderr.txt").write_text(err)
            with (dest / "calls.jsonl").open("w") as f:
                for item in proxy.bodies_of(run_id):
                    f.write(json.dumps(item) + "\n")

    calls = proxy.calls_of(run_id)
    return {
        "arm": arm, "task": task.name, "kind": task.kind, "solved": solved, "check": check_msg,
        "status": result.get("status") or ("failed" if crashed else None), "stop_reason": result.get("stop_reason"),
        "answer": answer[:2000], "steps": len(calls),
        "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
        "cached_tokens": sum(c["cached_tokens"] for c in calls),
        "completion_tokens": sum(c["completion_tokens"] for c in calls),
        "seconds": round(seconds, 2), "crashed": crashed, "error": error, "exit_code": rc,
        "traceback": result.get("traceback") if crashed else None,
        "reported": reported, "calls": calls,
    }


def _parse_json_stdout(out: str) -> dict[str, Any]:
    """The JSON object a runtime printed on stdout (the whole output, else its last JSON line)."""
    for text in [out.strip(), *reversed(out.strip().splitlines())]:
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return {}


# ----------------------------------------------------------------------------- arms, worker side
# `agent_bench.py _worker SPEC.json` runs one competitor arm in its own process (so a hung
# run can be killed at --task-timeout), with the workdir as its working directory.


def _clip(text: str) -> str:
    if len(text) <= OUTPUT_LIMIT:
        return text
    half = OUTPUT_LIMIT // 2
    return f"{text[:half]}\n... [{len(text) - OUTPUT_LIMIT} characters elided] ...\n{text[-half:]}"


def bash(command: str) -> str:
    """Run a bash command in the working directory; returns its exit code and output (stdout and stderr).

    Args:
        command: the command line, e.g. `ls -la` or `cat README.md`.
    """
    try:
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"the command ran past {COMMAND_TIMEOUT} s and was stopped"
    return _clip(f"exit code: {proc.returncode}\n{proc.stdout}{proc.stderr}")


def read_file(path: str) -> str:
    """Read a text file of the working directory.

    Args:
        path: the file's path, relative to the working directory.
    """
    try:
        return _clip(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        return f"error: {e}"


def write_file(path: str, content: str) -> str:
    """Write a text file in the working directory (creating its folders; an existing file is replaced).

    Args:
        path: the file's path, relative to the working directory.
        content: the whole new content of the file.
    """
    try:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
    except OSError as e:
        return f"error: {e}"
    return f"wrote {len(content)} characters to {path}"


def worker_smolagents(spec: dict[str, Any], code: bool) -> dict[str, Any]:
    import smolagents

    tools = [smolagents.tool(fn) for fn in (bash, read_file, write_file)]
    # One call per reply: with parallel calls a small model tends to repeat calls until max_tokens, and
    # smolagents rejects a reply that mixes final_answer with other calls.
    extra = {} if code else {"parallel_tool_calls": False}
    model = smolagents.OpenAIServerModel(model_id=spec["model_id"], api_base=spec["base_url"], api_key="none", **extra)
    if code:  # code in ```python fences, which small models write unprompted, rather than in <code> tags
        agent = smolagents.CodeAgent(tools=tools, model=model, max_steps=spec["max_steps"], verbosity_level=0,
                                     code_block_tags="markdown")
    else:
        agent = smolagents.ToolCallingAgent(tools=tools, model=model, max_steps=spec["max_steps"], verbosity_level=0)
    res = agent.run(spec["task"], return_full_result=True)
    usage = res.token_usage
    return {
        "answer": "" if res.output is None else str(res.output),
        "status": "finished" if res.state == "success" else "stopped",
        "stop_reason": res.state,
        "reported": {"steps": len([s for s in res.steps if s.get("step_number") is not None]),
                     "prompt_tokens": usage.input_tokens if usage else None,
                     "completion_tokens": usage.output_tokens if usage else None},
    }


def worker_mini_swe_agent(spec: dict[str, Any]) -> dict[str, Any]:
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.config import get_config_from_spec
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models import get_model_class

    config = get_config_from_spec(spec["mini_config"])  # default: mini.yaml, the config of the `mini` command
    model_cfg = dict(config.get("model", {}))
    # mini.yaml uses tool calls (LitellmModel); the text-based configs (default.yaml, mini_textbased.yaml) want
    # the model to write ```mswea_bash_command blocks, which LitellmTextbasedModel parses.
    text_based = "mswea_bash_command" in json.dumps(config)
    model_class = get_model_class("", model_cfg.pop("model_class", "litellm_textbased" if text_based else "litellm"))
    model_kwargs = {**model_cfg.pop("model_kwargs", {}), "api_base": spec["base_url"], "api_key": "none"}
    model = model_class(**model_cfg, model_name=f"openai/{spec['model_id']}", model_kwargs=model_kwargs,
                        cost_tracking="ignore_errors")
    env = LocalEnvironment(**{**config.get("environment", {}), "cwd": spec["workdir"], "timeout": COMMAND_TIMEOUT})
    agent_cfg = {k: v for k, v in config.get("agent", {}).items() if k not in ("mode", "confirm_exit", "agent_class")}
    agent = DefaultAgent(model, env, **{**agent_cfg, "step_limit": spec["max_steps"], "cost_limit": 0})
    info = agent.run(spec["task"])
    exit_status = info.get("exit_status", "")
    answer = (info.get("submission") or "").strip()
    if not answer:  # the submission is what follows the COMPLETE_TASK... line: usually nothing
        answer = next((m.get("content") or "" for m in reversed(agent.messages) if m.get("role") == "assistant" and m.get("content")), "")
    return {
        "answer": answer,
        "status": {"Submitted": "finished", "LimitsExceeded": "stopped"}.get(exit_status, "failed"),
        "stop_reason": exit_status,
        "reported": {"steps": agent.n_calls},
    }


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["workdir"])
    try:
        if spec["arm"] in ("smolagents", "smolagents-code"):
            result = worker_smolagents(spec, code=spec["arm"] == "smolagents-code")
        elif spec["arm"] == "mini-swe-agent":
            result = worker_mini_swe_agent(spec)
        else:
            raise ValueError(f"unknown arm {spec['arm']}")
        code = 0
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-4000:], "status": "failed"}
        code = 1
    Path(spec["result"]).write_text(json.dumps(result, indent=1, default=str))
    return code


# ----------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: success rate, steps, tokens, cache shares, time, crashes, success per kind."""
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        prompt = sum(r["prompt_tokens"] for r in rs)
        cached = sum(r["cached_tokens"] for r in rs)
        steady = [c for r in rs for c in r["calls"][1:]]
        steady_prompt = sum(c["prompt_tokens"] for c in steady)
        # the history of a later call: what the call before it read and wrote (the rest of its prompt is new)
        pairs = [(a, b) for r in rs for a, b in itertools.pairwise([c for c in r["calls"] if c["status"] == 200])]
        history = [min(a["prompt_tokens"] + a["completion_tokens"], b["prompt_tokens"]) for a, b in pairs]
        history_cached = sum(min(b["cached_tokens"], h) for (_, b), h in zip(pairs, history, strict=True))
        kinds: dict[str, list[bool]] = defaultdict(list)
        for r in rs:
            kinds[r["kind"]].append(r["solved"])
        out[arm] = {
            "tasks": len(rs),
            "solved": sum(r["solved"] for r in rs),
            "success_rate": sum(r["solved"] for r in rs) / len(rs),
            "mean_steps": statistics.fmean(r["steps"] for r in rs),
            "prompt_tokens": prompt,
            "mean_prompt_tokens": prompt / len(rs),
            "cached_tokens": cached,
            "cached_share": cached / prompt if prompt else 0.0,
            "steady_cached_share": sum(c["cached_tokens"] for c in steady) / steady_prompt if steady_prompt else 0.0,
            "history_cached_share": history_cached / sum(history) if sum(history) else 0.0,
            "completion_tokens": sum(r["completion_tokens"] for r in rs),
            "seconds": sum(r["seconds"] for r in rs),
            "mean_seconds": statistics.fmean(r["seconds"] for r in rs),
            "crashes": sum(r["crashed"] for r in rs),
            "server_errors": sum(c["status"] != 200 for r in rs for c in r["calls"]),
            "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(kinds.items())},
        }
    return out


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    head = ("| arm | solved | mean steps | prompt tok (mean/task) | cached | cached, steady | history cached | completion tok "
            "| wall s (mean/task) | crashes | HTTP errors | " + " | ".join(_kinds(summary)) + " |")
    lines = [head, "|" + "---|" * (11 + len(_kinds(summary)))]
    for arm, s in summary.items():
        lines.append(
            f"| {arm} | {s['solved']}/{s['tasks']} ({s['success_rate']:.0%}) | {s['mean_steps']:.1f} "
            f"| {s['prompt_tokens']:,} ({s['mean_prompt_tokens']:,.0f}) | {s['cached_share']:.0%} "
            f"| {s['steady_cached_share']:.0%} | {s.get('history_cached_share', 0.0):.0%} | {s['completion_tokens']:,} | {s['seconds']:,.0f} ({s['mean_seconds']:.0f}) "
            f"| {s['crashes']} | {s['server_errors']} | " + " | ".join(s["by_kind"].get(k, "-") for k in _kinds(summary)) + " |")
    return "\n".join(lines)


def _kinds(summary: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({k for s in summary.values() for k in s["by_kind"]})


def per_task_markdown(runs: list[dict[str, Any]]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    by = {(r["arm"], r["task"]): r for r in runs}
    lines = ["| task (solved, model calls) | " + " | ".join(arms) + " |", "|" + "---|" * (len(arms) + 1)]
    for task in dict.fromkeys(r["task"] for r in runs):
        cells = []
        for arm in arms:
            r = by.get((arm, task))
            if r is None:
                cells.append("-")
            else:
                verdict = "yes" if r["solved"] else "crash" if r["crashed"] else "no"
                cells.append(f"{verdict} ({r['steps']})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _server_models(server: str) -> list[str]:
    with urllib.request.urlopen(server.rstrip("/") + "/models", timeout=30) as resp:
        return [m["id"] for m in json.load(resp).get("data", [])]


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("longkv", "smolagents", "mini-swe-agent", "litellm", "openai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL (default: %(default)s)")
    ap.add_argument("--model-id", help="the model id to send (default: the one the server lists)")
    ap.add_argument("--arms", default="longkv,smolagents,mini-swe-agent",
                    help=f"comma-separated, from {', '.join(ARMS)} (default: %(default)s)")
    ap.add_argument("--tasks", help="comma-separated task ids or names (default: all; see --list)")
    ap.add_argument("--max-steps", type=int, default=15, help="step limit given to every arm (default: %(default)s)")
    ap.add_argument("--task-timeout", type=float, default=600, help="seconds per (arm, task) before it is killed and counted as a crash (default: %(default)s)")
    ap.add_argument("--temperature", default="0", help="temperature the proxy sets on every request, or 'keep' (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, help="cap the proxy puts on every request's max_tokens (default: none, "
                    "each arm's own setting or the server's default)")
    ap.add_argument("--out", type=Path, help="JSON results file (rewritten after every run)")
    ap.add_argument("--keep", type=Path, help="keep each run's workdir, logs and answer under KEEP/ARM/TASK")
    ap.add_argument("--longkv-args", default="", help="extra options for `longkv agent run`, e.g. '--no-sandbox'")
    ap.add_argument("--mini-config", default="mini.yaml", help="mini-swe-agent config: a name of its config folder or a "
                    "path (default: %(default)s, what its `mini` command uses; `mini_textbased.yaml`: bash in a "
                    "fenced block instead of a tool call)")
    ap.add_argument("--list", action="store_true", help="list the tasks and exit")
    ap.add_argument("--report", nargs="+", type=Path, metavar="RESULTS",
                    help="print the tables of these results files and exit: their runs merged, a later file's run "
                         "of an (arm, task) replacing an earlier one (an arm run again); with --out, the merge is written")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.out)

    tasks = load_tasks(args.tasks)
    if args.list:
        for t in tasks:
            print(f"{t.name:24} {t.kind:7} {t.checks}")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := [a for a in arms if a not in ARMS]:
        ap.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    try:
        served = _server_models(args.server)
    except (OSError, urllib.error.URLError, ValueError) as e:
        sys.exit(f"cannot reach {args.server}/models: {e} (start `longkv serve` first)")
    model_id = args.model_id or (served[0] if served else None)
    if not model_id:
        sys.exit("the server lists no model; pass --model-id")
    runnable = []
    for arm in arms:
        if why := arm_missing(arm):
            _progress(f"skipping arm {arm}: {why}")
        else:
            runnable.append(arm)
    if not runnable:
        sys.exit("no arm can run")
    temperature = None if args.temperature == "keep" else float(args.temperature)

    meta = {"server": args.server, "model_id": model_id, "arms": runnable, "skipped_arms": [a for a in arms if a not in runnable],
            "tasks": [t.name for t in tasks], "max_steps": args.max_steps, "task_timeout_s": args.task_timeout,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "longkv_args": args.longkv_args,
            "mini_config": args.mini_config, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
            "host": platform.node()}
    runs: list[dict[str, Any]] = []
    total, n = len(runnable) * len(tasks), 0
    _progress(f"{len(tasks)} tasks x {len(runnable)} arms ({', '.join(runnable)}) on {model_id} at {args.server}, "
              f"max {args.max_steps} steps, timeout {args.task_timeout:.0f} s")
    with RecordingProxy(args.server, temperature=temperature, max_tokens=args.max_tokens, timeout=args.task_timeout + 60,
                        keep_bodies=args.keep is not None) as proxy:
        for arm in runnable:
            for task in tasks:
                n += 1
                _progress(f"[{n}/{total}] {arm} {task.name} ...")
                r = run_one(arm, task, proxy, model_id, args.max_steps, args.task_timeout, args.keep,
                            shlex.split(args.longkv_args), args.mini_config)
                runs.append(r)
                share = r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0
                what = "SOLVED" if r["solved"] else "crashed" if r["crashed"] else "not solved"
                _progress(f"    {what}: {r['steps']} calls, {r['prompt_tokens']:,} prompt tokens ({share:.0%} cached), "
                          f"{r['completion_tokens']:,} completion, {r['seconds']:.0f} s, {r['status']}/{r['stop_reason']}"
                          + (f"; error: {r['error'][:200]}" if r["error"] else "")
                          + ("" if r["solved"] else f"; check: {r['check'].splitlines()[0][:160] if r['check'] else ''}"))
                if args.out:
                    _write(args.out, meta, runs)
    summary = summarize(runs)
    if args.out:
        _write(args.out, meta, runs)
        _progress(f"wrote {args.out}")
    print(f"\n{model_id}, {len(tasks)} tasks, max {args.max_steps} steps, temperature {args.temperature}\n")
    print(markdown(summary))
    print()
    print(per_task_markdown(runs))
    return 0


def report(paths: list[Path], out: Path | None = None) -> int:
    """Print the tables of results files merged (see ``--report``); write the merge to ``out`` if given."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    metas = []
    for p in paths:
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            sys.exit(f"error: no results file {p} (a run writes one with --out)")
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or "meta" not in data:
            sys.exit(f"error: {p} is not a results file of this script (it has no meta and runs)")
        metas.append(data["meta"])
        for r in data["runs"]:
            merged[(r["arm"], r["task"])] = r
    if len({m.get("model_id") for m in metas}) > 1 or len({m.get("max_steps") for m in metas}) > 1:
        sys.exit("error: these files differ in model or step limit: " + ", ".join(
            f"{p} ({m.get('model_id')}, {m.get('max_steps')} steps)" for p, m in zip(paths, metas, strict=True)))
    order = {a: i for i, a in enumerate(ARMS)}
    runs = sorted(merged.values(), key=lambda r: (order.get(r["arm"], len(ARMS)), r["task"]))
    meta = {**metas[0], "arms": sorted({r["arm"] for r in runs}, key=lambda a: order.get(a, len(ARMS))),
            "tasks": sorted({r["task"] for r in runs}), "merged_from": [str(p) for p in paths],
            "started": [m.get("started") for m in metas]}
    if out:
        _write(out, meta, runs)
        _progress(f"wrote {out}")
    print(f"\n{meta['model_id']}, {len(meta['tasks'])} tasks, max {meta['max_steps']} steps, merged from {len(paths)} file(s)\n")
    print(markdown(summarize(runs)))
    print()
    print(per_task_markdown(runs))
    return 0


def _write(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "summary": summarize(runs), "runs": runs}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
