"""benchmarks/tau2.py: runs tau2's CLI through the recording proxy and sums up its results.

tau2-bench itself is not installed here: a stand-in ``tau2`` executable takes the same options, sends its
model calls to the ``api_base`` it is given and writes a results file shaped as tau2 writes it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

FAKE_TAU2 = r'''#!PYTHON
import json, sys, urllib.error, urllib.request
a = sys.argv[1:]
opt = lambda k: a[a.index(k) + 1]
assert a[0] == "run" and opt("--agent") == "llm_agent_solo" and opt("--user") == "dummy_user" and "--skip-failed-samples" in a
llm = json.loads(opt("--agent-llm-args"))
sims = []
for i, task in enumerate(["create_task_1", "update_task_1"]):
    req = urllib.request.Request(llm["api_base"] + "/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": opt("--agent-llm").split("/", 1)[1], "messages": [{"role": "system", "content": task}],
                                                  "tool_choice": "required", **{k: v for k, v in llm.items() if k not in ("api_base", "api_key")}}).encode())
    try:
        urllib.request.urlopen(req, timeout=10).read()
    except urllib.error.HTTPError:
        pass  # tau2 records the task as failed and goes on
    sims.append({"task_id": task, "termination_reason": "agent_stop", "duration": 2.5 + i, "skipped": False,
                 "reward_info": {"reward": 1.0 - i}, "messages": [
                     {"role": "assistant", "tool_calls": [{"name": "create_task"}, {"name": "get_users"}]},
                     {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "###STOP###", "tool_calls": None}]})
sims.append({"task_id": "impossible_task_1", "termination_reason": "agent_error", "duration": 0.0, "skipped": True,
             "reward_info": {"reward": 0.0}, "messages": []})  # what --skip-failed-samples records for a run that raised
out = f"{opt('--results-dir')}/{opt('--save-to')}.json"
open(out, "w").write(json.dumps({"timestamp": "t", "info": {}, "tasks": [], "simulations": sims}))
'''


@pytest.fixture
def tau2_mod() -> Any:
    spec = importlib.util.spec_from_file_location("tau2_bench", BENCH / "tau2.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _openai_server(reply: Callable[[int], tuple[int, dict[str, Any]]],
                   models: tuple[str, ...] = ("served-model",)) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A server on a free port that answers the n-th POST (1-based) with ``reply(n)``: (status, JSON body), and
    GET /v1/models with ``models``."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self._send(*reply(len(seen)))

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OpenAI-shaped server: the first reply is cut at max_tokens, the second ends with tool calls."""

    def reply(n: int) -> tuple[int, dict[str, Any]]:
        usage = {"prompt_tokens": 800, "completion_tokens": 40 * n, "prompt_tokens_details": {"cached_tokens": 790 * (n - 1)}}
        return 200, {"choices": [{"message": {"role": "assistant"}, "finish_reason": "length" if n == 1 else "tool_calls"}], "usage": usage}

    with _openai_server(reply) as server:
        yield server


def _fake_tau2(tmp_path: Path) -> str:
    exe = tmp_path / "tau2"
    exe.write_text(FAKE_TAU2.replace("PYTHON", sys.executable))
    exe.chmod(0o755)
    return str(exe)


def test_run_counts_tokens_and_rewards(tau2_mod: Any, upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    server, seen = upstream
    out = tmp_path / "runs"
    assert tau2_mod.main(["--tau2", _fake_tau2(tmp_path), "--server", server, "--model-id", "qwen15", "--label", "one-call",
                          "--llm-args", '{"parallel_tool_calls": false}', "--out-dir", str(out)]) == 0
    # every request greedy, capped at --max-tokens, with the extra parameters, the model id as given
    assert [(s["model"], s["temperature"], s["max_tokens"], s["parallel_tool_calls"]) for s in seen] == [("qwen15", 0.0, 256, False)] * 2
    s = json.loads((out / "one-call.summary.json").read_text())
    assert (s["tasks"], s["pass_1"], s["solved"], s["model_calls"], s["calls_cut_at_max_tokens"]) == (3, 0.333, 1, 2, 1)
    assert (s["prompt_tokens"], s["cached_tokens"], s["cached_share"], s["completion_tokens"]) == (1600, 790, 0.494, 120)
    assert s["per_task"][0] == {"task": "create_task_1", "reward": 1.0, "termination": "agent_stop", "replies": 2,
                                "tool_calls": 2, "seconds": 2.5}
    assert s["terminations"] == {"agent_stop": 2, "tau2 raised": 1} and s["llm_args"] == {"parallel_tool_calls": False}
    assert '"api_base": "PROXY"' in s["tau2_command"]
    printed = capsys.readouterr().out
    assert re.search(r"\| one-call \| 3 \| 0.33 \| 1 \| 2 \| 0 \| 1 \| 1,600 \| 49.4 % \| 120 \| \d+ \| agent_stop 2, tau2 raised 1 \|", printed)
    assert "| update_task_1 | 0 (2 replies, agent_stop) |" in printed
    assert "| impossible_task_1 | 0 (0 replies, tau2 raised) |" in printed

    # --report puts arms side by side
    assert tau2_mod.main(["--report", str(out / "one-call.summary.json"), str(out / "one-call.summary.json")]) == 0
    assert "| task | one-call | one-call |" in capsys.readouterr().out

    # tau2's own results file is not a summary
    with pytest.raises(SystemExit, match="one-call.json is not a summary of this script"):
        tau2_mod.main(["--report", str(out / "one-call.json")])

    # a second run under the same label would make tau2 ask whether to resume: refused before it starts
    with pytest.raises(SystemExit, match="one-call.json exists .*another --label"):
        tau2_mod.main(["--tau2", _fake_tau2(tmp_path), "--server", server, "--model-id", "qwen15", "--label", "one-call",
                       "--out-dir", str(out)])
    assert len(seen) == 2


@pytest.mark.parametrize("argv, message", [
    (["--llm-args", "{parallel_tool_calls: false}"], "--llm-args is not JSON"),
    (["--llm-args", "[1]"], "--llm-args must be a JSON object"),
    (["--report", "nowhere.summary.json"], "no such summary: nowhere.summary.json"),
    ([], "a run needs --label"),
    (["--label", "x", "--server", "http://127.0.0.1:9/v1"], "cannot reach http://127.0.0.1:9/v1/models .*pass --model-id"),
    (["--model-id", "m", "--label", "x", "--server", "http://127.0.0.1:9/v1"], "no tau2 executable at '/nonexistent/tau2'.*--tau2"),
])
def test_bad_input_is_refused(tau2_mod: Any, tmp_path: Path, argv: list[str], message: str) -> None:
    base = ["--out-dir", str(tmp_path), "--tau2", "/nonexistent/tau2"]
    if argv and argv[0] == "--llm-args":
        base += ["--model-id", "m", "--label", "x"]
    with pytest.raises(SystemExit, match=message):
        tau2_mod.main(base + argv)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_model_id_defaults_to_the_servers_first(tau2_mod: Any, upstream: tuple[str, list[dict[str, Any]]],
                                                  tmp_path: Path) -> None:
    server, seen = upstream
    assert tau2_mod.main(["--tau2", _fake_tau2(tmp_path), "--server", server, "--label", "x", "--out-dir", str(tmp_path / "r")]) == 0
    assert {s["model"] for s in seen} == {"served-model"}
    assert json.loads((tmp_path / "r" / "x.summary.json").read_text())["model_id"] == "served-model"
    with _openai_server(lambda n: (500, {}), models=()) as (empty, _), \
            pytest.raises(SystemExit, match="/models lists no model: pass --model-id"):
        tau2_mod.main(["--tau2", _fake_tau2(tmp_path), "--server", empty, "--label", "y", "--out-dir", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()


def test_tau2_failure_names_its_log(tau2_mod: Any, upstream: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    exe = tmp_path / "tau2"
    exe.write_text(f"#!{sys.executable}\nimport sys; print('litellm.APIConnectionError'); sys.exit(2)\n")
    exe.chmod(0o755)
    with pytest.raises(SystemExit, match=r"tau2 exited with 2; its output is in .*bad\.log"):
        tau2_mod.main(["--tau2", str(exe), "--server", upstream[0], "--model-id", "m", "--label", "bad", "--out-dir", str(tmp_path)])
    assert "APIConnectionError" in (tmp_path / "bad.log").read_text()
    assert not (tmp_path / "bad.summary.json").exists()


def test_a_run_whose_calls_all_failed_is_an_error(tau2_mod: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong model id: every call a 404. The summary is written, a warning names the error, the exit is non-zero."""
    not_found = _openai_server(lambda n: (404, {"error": {"message": "model 'wrongid' not found"}}))
    with not_found as (server, _), pytest.raises(SystemExit, match="no model call succeeded \\(2 made\\): check --server and --model-id"):
        tau2_mod.main(["--tau2", _fake_tau2(tmp_path), "--server", server, "--model-id", "wrongid",
                       "--label", "wrong", "--out-dir", str(tmp_path)])
    assert "warning: 2 of 2 model calls failed (HTTP 404: " in capsys.readouterr().err
    assert json.loads((tmp_path / "wrong.summary.json").read_text())["failed_calls"] == 2
