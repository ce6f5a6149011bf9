"""The offline agent task suite (benchmarks/agent_tasks/) checks what it claims to check.

For every task: the untouched workdir fails its checker, the reference solution passes it,
and where the solution writes ``answer.txt``, the same value given only as the agent's final
answer text passes too. The harness's token-recording proxy is checked against a fake server.
No model is involved.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

TASKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_tasks"
TASKS = sorted(p for p in TASKS_DIR.iterdir() if p.is_dir() and p.name[:2].isdigit())
KINDS = {"edit", "data", "bugfix", "lookup"}


def _check(task: Path, workdir: Path, answer_text: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(task / "check.py"), str(workdir)]
    if answer_text is not None:
        answer_file = workdir.parent / "final_answer.txt"
        answer_file.write_text(answer_text, encoding="utf-8")
        cmd.append(str(answer_file))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _solve(task: Path, workdir: Path) -> None:
    if (task / "solution").is_dir():
        shutil.copytree(task / "solution", workdir, dirs_exist_ok=True)
    if (task / "solve.sh").is_file():
        subprocess.run(["bash", str(task / "solve.sh")], cwd=workdir, check=True, timeout=60,
                       env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LC_ALL": "C"})


def test_suite_size_and_kinds() -> None:
    assert len(TASKS) >= 30
    assert len({t.name[:2] for t in TASKS}) == len(TASKS), "task ids must be unique"
    kinds = [json.loads((t / "meta.json").read_text())["kind"] for t in TASKS]
    assert set(kinds) == KINDS
    assert min(kinds.count(k) for k in KINDS) >= 6, "kinds should be roughly balanced"


@pytest.mark.parametrize("task", TASKS, ids=[t.name for t in TASKS])
def test_task(task: Path, tmp_path: Path) -> None:
    assert (task / "task.md").read_text().strip(), "task.md is empty"
    assert json.loads((task / "meta.json").read_text())["kind"] in KINDS
    assert (task / "solve.sh").is_file() or (task / "solution").is_dir()
    workdir = tmp_path / "work"
    shutil.copytree(task / "files", workdir)

    untouched = _check(task, workdir, "")
    assert untouched.returncode == 1, f"the untouched workdir passes:\n{untouched.stdout}{untouched.stderr}"
    assert untouched.stdout.startswith("FAIL"), untouched.stdout + untouched.stderr

    _solve(task, workdir)
    solved = _check(task, workdir)
    assert solved.returncode == 0, f"the reference solution fails:\n{solved.stdout}{solved.stderr}"

    answer = workdir / "answer.txt"
    if answer.is_file():  # a value task: the final answer text alone is accepted too
        value = answer.read_text().strip()
        answer.unlink()
        assert _check(task, workdir).returncode == 1
        via_text = _check(task, workdir, f"The answer is {value}.")
        assert via_text.returncode == 0, via_text.stdout


def test_answer_matching() -> None:
    spec = importlib.util.spec_from_file_location("_checklib", TASKS_DIR / "_checklib.py")
    assert spec and spec.loader
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    assert lib.matches("15\n", 15)
    assert lib.matches("The total is 1,234.50.", 1234.5)
    assert lib.matches("`Juniper`", "juniper")
    assert lib.matches("The codename is Juniper.", "Juniper")
    assert not lib.matches("16", 15)
    assert not lib.matches("Junipers", "Juniper")
    assert not lib.matches("10.2.3.711", "10.2.3.71")
    assert not lib.matches("", 0)
    assert not lib.matches("word " * 100 + "15", 15), "a long text must be the value itself"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("agent_bench", TASKS_DIR.parent / "agent_bench.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["agent_bench"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_recording_proxy_reads_usage_and_sets_sampling() -> None:
    """The harness's proxy forwards /r/RUN/v1/* to the server, records usage per run (JSON and SSE),
    and applies --temperature and --max-tokens to every request."""
    bench = _load_bench()
    seen: list[dict[str, Any]] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            usage = {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}}
            if body.get("stream"):
                chunks = [{"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]},
                          {"choices": [{"delta": {}, "finish_reason": "stop"}]}, {"choices": [], "usage": usage}]
                data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"
                ctype = "text/event-stream"
            else:
                data = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": usage}).encode()
                ctype = "application/json"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with bench.RecordingProxy(f"http://127.0.0.1:{upstream.server_address[1]}/v1", temperature=0.0, max_tokens=64) as proxy:
            for stream in (False, True):
                req = urllib.request.Request(proxy.base_url("run-1") + "/chat/completions", method="POST",
                                             headers={"Content-Type": "application/json"},
                                             data=json.dumps({"messages": [], "temperature": 0.7, "max_tokens": 500,
                                                              "stream": stream}).encode())
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert resp.status == 200 and b"hi" in resp.read()
            calls = proxy.calls_of("run-1")
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert [s["path"] for s in seen] == ["/v1/chat/completions"] * 2
    assert all(s["temperature"] == 0.0 and s["max_tokens"] == 64 for s in seen)
    assert [(c["prompt_tokens"], c["cached_tokens"], c["completion_tokens"], c["stream"]) for c in calls] == [
        (100, 60, 7, False), (100, 60, 7, True)]
    summary = bench.summarize([{"arm": "a", "kind": "data", "solved": True, "steps": 2, "prompt_tokens": 200,
                                "cached_tokens": 120, "completion_tokens": 14, "seconds": 1.0, "crashed": False,
                                "calls": calls}])["a"]
    assert summary["cached_share"] == 0.6 and summary["steady_cached_share"] == 0.6 and summary["success_rate"] == 1.0
    assert summary["history_cached_share"] == 0.6  # the second call's history: the first call's 100 prompt tokens
    # a later call's history is what the call before it read and wrote; the rest of its prompt is new
    grown = [{"status": 200, "prompt_tokens": 100, "cached_tokens": 100, "completion_tokens": 10},
             {"status": 500, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0},
             {"status": 200, "prompt_tokens": 150, "cached_tokens": 105, "completion_tokens": 5}]  # fmt: skip
    run = {"arm": "b", "kind": "data", "solved": False, "steps": 3, "prompt_tokens": 250, "cached_tokens": 205,
           "completion_tokens": 15, "seconds": 1.0, "crashed": False, "calls": grown}
    assert bench.summarize([run])["b"]["history_cached_share"] == 105 / 110


def _run(arm: str, task: str, solved: bool, prompt: int, cached: int) -> dict[str, Any]:
    calls = [{"status": 200, "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": 10, "seconds": 1.0}]
    return {"arm": arm, "task": task, "kind": "edit", "solved": solved, "steps": 1, "prompt_tokens": prompt,
            "cached_tokens": cached, "completion_tokens": 10, "seconds": 1.0, "crashed": False, "calls": calls}


def test_report_merges_results_files_a_later_run_replacing_an_earlier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_bench()
    meta = {"model_id": "m", "max_steps": 8, "started": "t"}
    first = tmp_path / "a.json"
    first.write_text(json.dumps({"meta": meta, "runs": [_run("longkv", "01-x", True, 100, 50), _run("smolagents", "01-x", False, 100, 0)]}))
    again = tmp_path / "b.json"
    again.write_text(json.dumps({"meta": {**meta, "started": "u"}, "runs": [_run("smolagents", "01-x", True, 100, 90)]}))
    out = tmp_path / "ab.json"
    assert bench.main(["--report", str(first), str(again), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [(r["arm"], r["solved"]) for r in merged["runs"]] == [("longkv", True), ("smolagents", True)]
    assert merged["summary"]["smolagents"]["cached_tokens"] == 90 and merged["meta"]["started"] == ["t", "u"]
    assert "| 01-x | yes (1) | yes (1) |" in capsys.readouterr().out
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"meta": {**meta, "model_id": "n"}, "runs": []}))
    with pytest.raises(SystemExit, match="differ in model or step limit"):
        bench.main(["--report", str(first), str(other)])
    with pytest.raises(SystemExit, match="no results file"):
        bench.main(["--report", str(tmp_path / "none.json")])
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(SystemExit, match="is not a results file of this script"):
        bench.main(["--report", str(tmp_path / "bad.json")])
