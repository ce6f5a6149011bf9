"""``longkv agent show``: a run's trajectory from its log, as a table (Rich) or JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from longkv.agent.runlog import Event, RunInfo, RunLog

NOTE_CHARS = 300  # most characters of a note the table shows (agent show --step N shows a step whole)


def steps(events: list[Event]) -> list[dict[str, Any]]:
    """One row per model call: prompt / cached / new tokens, decode tokens, seconds, the calls and their outcome
    (with KV memory: the session's KV tokens and the edits of the call, by kind), and the notes (corrections,
    loop hints, caps) that followed it."""
    rows: list[dict[str, Any]] = []
    by_call: dict[str, dict[str, Any]] = {}
    result_steps: list[int] = []  # the step of each tool result, in the run's numbering of results
    for e in events:
        d = e.data
        if e.kind == "request" and d.get("drop"):
            rows.append({"note": f"{d['drop']} earlier step(s) left the context (window)"})
        elif e.kind == "reply":
            u = d["usage"]
            row = {"step": len([r for r in rows if "step" in r]) + 1, "prompt": u["prompt"], "cached": u["cached"],
                   "new": u["prompt"] - u["cached"], "decode": u["completion"], "model_s": d["seconds"], "tool_s": 0.0,
                   "calls": [], "text": d["content"]}  # fmt: skip
            if d.get("truncated"):  # a call cut off at the token limit: what the model wrote of it
                row["truncated"] = d["truncated"]
            if d.get("memory"):  # a KV memory session: its KV after the call and what the server did to it
                row["kv"], row["edits"] = d["memory"]["kv_tokens"], d["memory"]["edits"]
            for c in d["tool_calls"]:
                call = {"id": c["id"], "name": c["name"], "arguments": c["arguments"], "status": "not run"}
                row["calls"].append(call)
                by_call[c["id"]] = call
            rows.append(row)
        elif e.kind == "tool_start" and d["id"] in by_call:
            by_call[d["id"]]["status"] = "started"
        elif e.kind == "tool_result" and d["id"] in by_call:
            call = by_call[d["id"]]
            out = d["output"]
            result_steps.append(next((r["step"] for r in reversed(rows) if "step" in r), 0))
            code = re.findall(r"^\[exit code (-?\d+)\]$", out, re.M) if d["name"] in ("bash", "python") else []
            if d.get("interrupted"):
                call["status"] = "interrupted"
            elif d.get("repeat"):
                n = d["repeat"]  # a result number; a step without a result (a cut-off reply) makes steps run ahead
                call["status"] = f"not run: repeats step {result_steps[n - 1]}" if 0 < n <= len(result_steps) else f"not run: repeats result {n}"
            elif d.get("planless"):
                call["status"] = "not kept"
            elif d["error"]:
                call["status"] = "error"
            elif code:  # the runtime's exit line (the changed files or a hint may follow it)
                call["status"] = f"exit {code[-1]}"
            elif "[killed: " in out[-120:]:
                call["status"] = "killed"
            else:
                call["status"] = "ok"
            call["output"] = out
            for r in reversed(rows):
                if "step" in r:
                    r["tool_s"] = round(r["tool_s"] + d.get("seconds", 0.0), 4)
                    break
        elif e.kind == "note":
            rows.append({"note": f"message: {d['content']}" if d.get("source") == "user" else d["content"]})
        elif e.kind == "loop":
            rows.append({"note": f"loop detected ({d['kind']}): {d['signature'][:80]}"})
    return rows


def summary(info: RunInfo, events: list[Event]) -> dict[str, Any]:
    rows = steps(events)
    model = [r for r in rows if "step" in r]
    prompt = sum(r["prompt"] for r in model)
    cached = sum(r["cached"] for r in model)
    steady = model[1:]
    sp, sc = sum(r["prompt"] for r in steady), sum(r["cached"] for r in steady)
    return {
        "run": info.id, "status": info.status, "task": info.task, "workdir": info.workdir, "answer": info.answer, "reason": info.reason,
        "steps": len(model), "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": sum(r["decode"] for r in model),
        "cache_hit": round(cached / prompt, 4) if prompt else 0.0, "steady_cache_hit": round(sc / sp, 4) if sp else 0.0,
        "model_s": round(sum(r["model_s"] for r in model), 3), "tool_s": round(sum(r["tool_s"] for r in model), 3),
    }  # fmt: skip


def render(log: RunLog, run_id: str | None, as_json: bool, step: int | None, console: Any) -> None:
    """Print a run (or, without ``run_id``, the latest runs) to ``console`` (a Rich console)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if run_id is None:
        runs = log.runs()
        if as_json:
            print(json.dumps([r.__dict__ for r in runs], indent=1))
            return
        if not runs:
            console.print(f"no runs yet in {log.dir}: start one with longkv agent run")
            return
        t = Table("run", "status", "task", title=f"runs in {log.dir}")
        for run in runs:
            task = run.task.replace("\n", " ")
            t.add_row(run.id, run.status, escape(task if len(task) <= 70 else task[:69] + "…"))
        console.print(t)
        return
    info = log.info(run_id)
    events = log.events(info.id)
    rows = steps(events)
    if step is not None:
        model = [r for r in rows if "step" in r]
        if not 1 <= step <= len(model):
            from longkv.errors import LongKVError

            raise LongKVError(f"run {info.id} has steps 1 to {len(model)}, not {step}")
        r = model[step - 1]
        if as_json:
            print(json.dumps(r, indent=1, ensure_ascii=False))
            return
        if r["text"]:
            console.print(f"[bold]model text[/]\n{escape(r['text'])}")
        if r.get("truncated"):
            cut = r["truncated"]
            console.print(f"[bold]{escape(cut.get('name') or 'a tool call')}, cut off at the token limit[/]\n{escape(cut['text'])}", soft_wrap=True)
        if not r["text"] and not r["calls"] and not r.get("truncated"):
            console.print(f"[dim]no text and no tool call ({r['decode']} tokens decoded)[/]")
        for c in r["calls"]:
            console.print(f"[bold]{escape(c['name'])}[/] {escape(c['arguments'])} -> {c['status']}")
            console.print(escape(c.get("output", "")), soft_wrap=True)
        return
    summ = summary(info, events)
    if as_json:
        print(json.dumps({**summ, "trajectory": rows}, indent=1, ensure_ascii=False))
        return
    memory = any("kv" in r for r in rows)
    wide = console.width >= 120  # a narrower terminal gets the columns that matter (the totals are printed below)
    cols = ["step", "prompt", "cached", *(["new", "decode"] if wide else []), "model s", *(["tool s"] if wide else []),
            *(["KV", "KV edits"] if memory else [])]  # fmt: skip
    t = Table(title=f"run {info.id}: {info.status}", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        t.add_column(c, no_wrap=True, justify="left" if c in ("step", "KV edits") else "right")
    t.add_column("calls", ratio=1, overflow="fold")
    for r in rows:
        if "note" in r:
            note = r["note"] if len(r["note"]) <= NOTE_CHARS else r["note"][: NOTE_CHARS - 1] + "…"
            t.add_row(*[""] * len(cols), f"[dim]{escape(note)}[/]")
            continue
        cut = f"{(r['truncated'].get('name') or 'call')} (cut off)" if r.get("truncated") else ""
        calls = ", ".join(f"{c['name']} ({c['status']})" for c in r["calls"]) or escape(r["text"][:60].replace("\n", " ") or cut)
        kv = [str(r.get("kv", "")), ", ".join(f"{k} {n}" for k, n in (r.get("edits") or {}).items())] if memory else []
        extra = [str(r["new"]), str(r["decode"])] if wide else []
        t.add_row(str(r["step"]), str(r["prompt"]), str(r["cached"]), *extra, f"{r['model_s']:.2f}", *([f"{r['tool_s']:.2f}"] if wide else []),
                  *kv, calls)  # fmt: skip
    console.print(t)
    if memory:
        console.print("[dim]KV: the session's KV tokens after the step; KV edits: what the server did to them "
                      "(compress, stub, cut, drop, align; docs/memory.md)[/]")  # fmt: skip
    console.print(f"task: {escape(info.task[:300])}")
    console.print(f"answer: {escape(str(info.answer or ''))[:500]}" + (f"  [dim]({escape(info.reason or '')})[/]" if info.reason else ""))
    console.print(f"{summ['steps']} steps, {summ['prompt_tokens']} prompt tokens ({summ['cache_hit']:.1%} from the prefix cache, "
                  f"{summ['steady_cache_hit']:.1%} after the first step), {summ['completion_tokens']} decoded; "
                  f"model {summ['model_s']:.1f} s, tools {summ['tool_s']:.1f} s")  # fmt: skip
