"""KV memory for agents: long runs on a small window, and sessions that come back from disk.

``horizon``: a scripted SWE-style trajectory (fixed tool outputs cut from a
public-domain book, 80-600 tokens each, a 16-token reply per step, greedy)
sent to ``longkv serve``'s app in this process, in three arms that keep the
history within the model's window:

* ``text-window``: what agent frameworks do by default: once the prompt passes
  the window (less the reply), the oldest whole turns leave the text until it
  is under 3/4 of it (prefix cache on; everything after the cut is prefilled
  again);
* ``text-summary``: once the prompt passes the window, the model writes a
  summary of the oldest half of the turns (a request of its own) that replaces
  them, until the prompt is under 3/4 of it;
* ``kv-memory``: the whole history is sent every step with
  ``"longkv": {"session": ..., "memory": {}}``; the server keeps it as KV spans,
  compresses each tool result to half once a step has read it, and compresses
  then drops the oldest spans when the window fills.

Per arm: prompt tokens served from KV on steady-state steps (after the first
10), tokens prefilled per step, the largest KV a request held, requests refused
for overflow, seconds.

``resume``: a session of N tokens of a book is prefilled, saved with
``KVMemory.save`` and read back with ``KVMemory.load``; the next-token logits
after a question must be equal, and the read must beat the prefill by the
ratio printed.

    python benchmarks/memory.py horizon --model "$(../shared/models/get-model smollm2-135m)" --steps 200 \\
        --out benchmarks/results/memory-horizon-smollm2.json
    python benchmarks/memory.py resume --model "$(../shared/models/get-model qwen2.5-coder-0.5b)" --tokens 16384 \\
        --out benchmarks/results/memory-resume-qwen05.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BOOKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "books"
SYSTEM = "You are a software agent. You read tool outputs and decide the next command. Answer briefly."
TASK = "Find why the nightly report job fails and fix it. The repository is in /work/repo."
REPLY_TOKENS = 16


def tool_outputs(llm: Any, steps: int, seed: int = 0) -> list[str]:
    """``steps`` fixed tool outputs: book passages of 80-600 tokens (a deterministic cycle of lengths)."""
    text = (BOOKS / "moby-dick.txt").read_text(encoding="utf-8")
    ids = llm.encode(text[20_000:])
    lengths = [80, 350, 150, 600, 120, 250, 400, 90]
    out, at = [], seed * 1000
    for i in range(steps):
        n = lengths[i % len(lengths)]
        out.append(f"$ cat logs/part{i}.txt\n" + llm.tokenizer.decode(ids[at : at + n]))
        at += n
    return out


def prompt_tokens(llm: Any, messages: list[dict[str, Any]]) -> int:
    from longkv.server.tools import render_messages, tool_format

    rendered, _ = render_messages(messages, None, tool_format(llm.tokenizer))
    return len(llm.prompt_ids(llm.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)))


def horizon(args: argparse.Namespace) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from longkv import LLM
    from longkv.server.app import create_app
    from longkv.server.worker import ServerConfig

    llm = LLM(args.model, dtype="bfloat16", threads=args.threads)
    window = llm.config.max_position
    outputs = tool_outputs(llm, args.steps)
    cfg = ServerConfig(model_id="m", default_max_tokens=REPLY_TOKENS, memory_bytes=1 << 30)
    results: dict[str, Any] = {"model": args.model, "window": window, "steps": args.steps, "arms": {}}
    for arm in args.arms:
        with TestClient(create_app(llm, cfg)) as client:

            def ask(messages: list[dict[str, Any]], memory: bool, max_tokens: int = REPLY_TOKENS) -> dict[str, Any]:
                body: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                        "longkv": {"ignore_eos": True}}  # fmt: skip
                if memory:
                    body["longkv"].update(session="run", memory={})
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(r.text[:300])
                return dict(r.json())

            front = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
            turns: list[list[dict[str, Any]]] = []
            rows: list[dict[str, Any]] = []
            refused = 0
            t0 = time.perf_counter()
            for step in range(args.steps):
                history = [m for t in turns for m in t]
                extra = 0
                room = window - REPLY_TOKENS
                if arm != "kv-memory" and prompt_tokens(llm, front + history) > room:  # full: make room down to 3/4
                    while prompt_tokens(llm, front + history) > 3 * room // 4 and len(turns) > 1:
                        if arm == "text-window":
                            turns.pop(0)
                        else:  # text-summary: the oldest half becomes one summary written by the model
                            half = max(1, len(turns) // 2)
                            old = "\n\n".join(m["content"] for t in turns[:half] for m in t)
                            words = llm.tokenizer.decode(llm.encode(old)[-(window // 2) :])
                            s = ask([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"Summarize these earlier steps in under 60 words:\n\n{words}"}], False, 96)  # fmt: skip
                            extra += s["usage"]["prompt_tokens"] - s["usage"]["prompt_tokens_details"]["cached_tokens"]
                            summary = [{"role": "user", "content": "Summary of earlier steps: " + s["choices"][0]["message"]["content"]}]
                            turns = [summary, *turns[half:]]
                        history = [m for t in turns for m in t]
                try:
                    out = ask(front + history, arm == "kv-memory")
                except RuntimeError as exc:
                    refused += 1
                    print(f"  step {step}: refused: {exc}", file=sys.stderr)
                    break
                u = out["usage"]
                mem = (out.get("longkv") or {}).get("memory") or {}
                rows.append({
                    "step": step, "prompt": u["prompt_tokens"], "cached": u["prompt_tokens_details"]["cached_tokens"],
                    "prefilled": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] + extra,
                    "kv_tokens": mem.get("kv_tokens", u["prompt_tokens"] + u["completion_tokens"]),
                    "logical_tokens": mem.get("logical_tokens"), "edits": len(mem.get("edits", [])),
                })  # fmt: skip
                reply = out["choices"][0]["message"]["content"]
                turns.append([{"role": "assistant", "content": reply}, {"role": "tool", "content": outputs[step], "tool_call_id": f"c{step}"}])
                if step % 20 == 0:
                    r = rows[-1]
                    print(f"  {arm} step {step}: prompt {r['prompt']} cached {r['cached']} kv {r['kv_tokens']} {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            seconds = time.perf_counter() - t0
        steady = rows[10:] or rows
        results["arms"][arm] = {
            "steps": len(rows), "refused": refused, "seconds": round(seconds, 1),
            "cache_hit": round(sum(r["cached"] for r in steady) / max(1, sum(r["prompt"] for r in steady)), 4),
            "prefilled_per_step_median": statistics.median(r["prefilled"] for r in steady),
            "prefilled_per_step_mean": round(statistics.mean(r["prefilled"] for r in steady), 1),
            "prefilled_total": sum(r["prefilled"] for r in rows),
            "max_kv_tokens": max(r["kv_tokens"] for r in rows),
            "final_logical_tokens": rows[-1]["logical_tokens"], "rows": rows,
        }  # fmt: skip
        if args.out is not None:  # after every arm: a long run stopped half-way keeps what it measured
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'arm':14} {'steps':>5} {'refused':>7} {'KV hit':>7} {'prefill/step':>12} {'prefill total':>13} {'max KV':>7} {'s':>6}")
    for arm, r in results["arms"].items():
        print(f"{arm:14} {r['steps']:>5} {r['refused']:>7} {r['cache_hit']:>7.1%} {r['prefilled_per_step_median']:>12} "
              f"{r['prefilled_total']:>13} {r['max_kv_tokens']:>7} {r['seconds']:>6}")  # fmt: skip
    return results


def resume(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from longkv import LLM
    from longkv.engine.memory import KVMemory
    from longkv.engine.runner import Runner

    llm = LLM(args.model, dtype="bfloat16", threads=args.threads)
    text = (BOOKS / "pride-and-prejudice.txt").read_text(encoding="utf-8")
    ids = llm.encode(text)[: args.tokens]
    question = llm.encode("\n\nWho is the second daughter of the Bennet family?")

    def runner() -> Runner:
        return Runner(llm.model, llm.resolve_policy(0, "dense"), llm.engine_config)

    with torch.inference_mode():
        mem = KVMemory(runner())
        t0 = time.perf_counter()
        mem.append("user", ids, pinned=True)
        prefill_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "session.kv"
            t0 = time.perf_counter()
            size = mem.save(path, "m")
            save_s = time.perf_counter() - t0
            loads = []
            for _ in range(3):
                t0 = time.perf_counter()
                back = KVMemory.load(path, runner(), "m")
                loads.append(time.perf_counter() - t0)
            load_s = statistics.median(loads)
        warm = mem.append("user", question)[1]
        cold = back.append("user", question)[1]
    equal = bool(torch.equal(warm, cold))
    out = {
        "model": args.model, "tokens": len(ids), "prefill_s": round(prefill_s, 2), "save_s": round(save_s, 3),
        "load_s": round(load_s, 3), "bytes": size, "speedup": round(prefill_s / load_s, 1), "logits_equal": equal,
    }  # fmt: skip
    print(f"{len(ids)} tokens: prefill {prefill_s:.1f} s, save {save_s:.2f} s ({size / 2**20:.0f} MiB), "
          f"load {load_s:.3f} s (median of 3): {prefill_s / load_s:.0f}x; next-token logits equal: {equal}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("horizon", help="a long scripted run: text-window vs text-summary vs kv-memory")
    h.add_argument("--steps", type=int, default=200)
    h.add_argument("--arms", nargs="+", default=["kv-memory", "text-window", "text-summary"])
    r = sub.add_parser("resume", help="a session saved and read back vs prefilled again")
    r.add_argument("--tokens", type=int, default=16384)
    for p in (h, r):
        p.add_argument("--model", required=True)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = horizon(args) if args.cmd == "horizon" else resume(args)
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
