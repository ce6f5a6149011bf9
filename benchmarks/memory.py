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
10), tokens prefilled per step, the largest KV a request held, the most the
server's page pools held (``longkv_kv_pool_bytes``: used and free pages, prefix
cache included), requests refused for overflow, seconds.

``recall``: the same trajectory with a fact in some early tool results
(``config/<service>.env`` holding a 6-digit ``TOKEN``, at steps 2, 6, 10, ...),
each numbered ``[result N]`` as ``longkv agent`` numbers them, and the tools
``recall`` and ``finish`` offered at every step. At the end each fact is asked
for: every arm answers from what it kept; the kv-memory arm is asked again with
a forced ``recall`` call (the model writes the query, longkv agent's recall
answers it) and a forced ``finish`` with the answer. Per arm: facts answered,
prefill, largest KV; for recall also whether the fact's result was among those
recalled.

``resume``: a session of N tokens of a book is prefilled, saved with
``KVMemory.save`` and read back with ``KVMemory.load``; the next-token logits
after a question must be equal, and the read must beat the prefill by the
ratio printed.

    python benchmarks/memory.py horizon --model "$(../shared/models/get-model smollm2-135m)" --steps 200 \\
        --out benchmarks/results/memory-horizon-smollm2.json
    python benchmarks/memory.py recall --model "$(../shared/models/get-model qwen2.5-coder-0.5b)" --steps 130 \\
        --window 8192 --out benchmarks/results/memory-recall-qwen05.json
    python benchmarks/memory.py resume --model "$(../shared/models/get-model qwen2.5-coder-0.5b)" --tokens 16384 \\
        --out benchmarks/results/memory-resume-qwen05.json
"""

from __future__ import annotations

import argparse
import json
import re
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


def prompt_tokens(llm: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    from longkv.server.tools import render_messages, tool_format

    rendered, tt = render_messages(messages, tools, tool_format(llm.tokenizer))
    return len(llm.prompt_ids(llm.tokenizer.apply_chat_template(rendered, tools=tt, add_generation_prompt=True, tokenize=False)))


class Arm:
    """One arm's server (``longkv serve``'s app in this process) and its scripted trajectory.

    ``step(reply_to)`` sends the history (kept within the window the arm's way) and
    appends the reply and the next tool output; ``rows`` holds each request's usage.
    """

    def __init__(self, client: Any, llm: Any, arm: str, window: int, tools: list[dict[str, Any]] | None = None) -> None:
        self.client, self.llm, self.arm, self.window = client, llm, arm, window
        # tools offered (not called) at every step: they are part of the rendered system prompt, which must not change
        self.offer: dict[str, Any] = {"tools": tools, "tool_choice": "none"} if tools else {}
        self.front = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        self.turns: list[list[dict[str, Any]]] = []
        self.rows: list[dict[str, Any]] = []
        self.summaries = 0

    def ask(self, messages: list[dict[str, Any]], memory: bool, max_tokens: int = REPLY_TOKENS, eos: bool = False,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
        body: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                "longkv": {"ignore_eos": not eos}, **extra}  # fmt: skip
        if memory:
            body["longkv"].update(session="run", memory={})
        r = self.client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(r.text[:300])
        return dict(r.json())

    def history(self) -> list[dict[str, Any]]:
        """What the arm sends: the front and the turns it still keeps (kv-memory: all of them)."""
        extra = 0
        room = self.window - REPLY_TOKENS
        llm = self.llm
        tools = self.offer.get("tools")
        if self.arm != "kv-memory" and prompt_tokens(llm, self.front + self._flat(), tools) > room:  # full: make room down to 3/4
            while prompt_tokens(llm, self.front + self._flat(), tools) > 3 * room // 4 and len(self.turns) > 1:
                if self.arm == "text-window":
                    self.turns.pop(0)
                else:  # text-summary: the oldest half becomes one summary written by the model
                    half = max(1, len(self.turns) // 2)
                    old = "\n\n".join(m["content"] for t in self.turns[:half] for m in t)
                    words = llm.tokenizer.decode(llm.encode(old)[-(self.window // 2) :])
                    s = self.ask([{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"Summarize these earlier steps in under 60 words:\n\n{words}"}], False, 96)  # fmt: skip
                    extra += s["usage"]["prompt_tokens"] - s["usage"]["prompt_tokens_details"]["cached_tokens"]
                    summary = [{"role": "user", "content": "Summary of earlier steps: " + s["choices"][0]["message"]["content"]}]
                    self.turns = [summary, *self.turns[half:]]
                    self.summaries += 1
        self._extra = extra
        return self.front + self._flat()

    def _flat(self) -> list[dict[str, Any]]:
        return [m for t in self.turns for m in t]

    def step(self, output: str, said: str | None = None) -> None:
        """One model call on the history, then ``output`` as the tool result. ``said``: the assistant's words
        to keep in the history instead of the model's reply (a scripted trajectory; the model writes one token)."""
        out = self.ask(self.history(), self.arm == "kv-memory", 1 if said else REPLY_TOKENS, **self.offer)
        u = out["usage"]
        mem = (out.get("longkv") or {}).get("memory") or {}
        self.rows.append({
            "step": len(self.rows), "prompt": u["prompt_tokens"], "cached": u["prompt_tokens_details"]["cached_tokens"],
            "prefilled": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] + self._extra,
            "kv_tokens": mem.get("kv_tokens", u["prompt_tokens"] + u["completion_tokens"]),
            "logical_tokens": mem.get("logical_tokens"), "edits": len(mem.get("edits", [])),
        })  # fmt: skip
        reply = said or out["choices"][0]["message"]["content"]
        n = len(self.rows)
        self.turns.append([{"role": "assistant", "content": reply}, {"role": "tool", "content": output, "tool_call_id": f"c{n}"}])

    def summary(self, seconds: float) -> dict[str, Any]:
        rows = self.rows
        steady = rows[10:] or rows
        return {
            "steps": len(rows), "seconds": round(seconds, 1), "summaries": self.summaries,
            "cache_hit": round(sum(r["cached"] for r in steady) / max(1, sum(r["prompt"] for r in steady)), 4),
            "prefilled_per_step_median": statistics.median(r["prefilled"] for r in steady),
            "prefilled_per_step_mean": round(statistics.mean(r["prefilled"] for r in steady), 1),
            "prefilled_total": sum(r["prefilled"] for r in rows),
            "max_kv_tokens": max(r["kv_tokens"] for r in rows),
            "max_pool_mib": max(r.get("pool_mib", 0.0) for r in rows),
            "final_logical_tokens": rows[-1]["logical_tokens"], "rows": rows,
        }  # fmt: skip


def _pool_bytes(client: Any) -> float:
    """``longkv_kv_pool_bytes`` from the server's ``/metrics``: what its page pools hold, used and free pages."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("longkv_kv_pool_bytes "):
            return float(line.split()[1])
    raise RuntimeError("/metrics has no longkv_kv_pool_bytes")


def _serve(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """The model, the server config, the window (``--window`` runs the model as if its window were that)."""
    import dataclasses

    from longkv import LLM
    from longkv.server.worker import ServerConfig

    llm = LLM(args.model, dtype="bfloat16", threads=args.threads)
    if args.window:
        if args.window > llm.config.max_position:
            raise SystemExit(f"--window {args.window} is over the model's {llm.config.max_position}")
        llm.config = dataclasses.replace(llm.config, max_position=args.window)
    cfg = ServerConfig(model_id="m", default_max_tokens=REPLY_TOKENS, memory_bytes=1 << 30)
    return llm, cfg, llm.config.max_position


def horizon(args: argparse.Namespace) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from longkv.server.app import create_app

    llm, cfg, window = _serve(args)
    outputs = tool_outputs(llm, args.steps)
    results: dict[str, Any] = {"model": args.model, "window": window, "steps": args.steps, "arms": {}}
    for name in args.arms:
        with TestClient(create_app(llm, cfg)) as client:
            arm = Arm(client, llm, name, window)
            refused = 0
            t0 = time.perf_counter()
            for step in range(args.steps):
                try:
                    arm.step(outputs[step])
                except RuntimeError as exc:
                    refused += 1
                    print(f"  step {step}: refused: {exc}", file=sys.stderr)
                    break
                r = arm.rows[-1]
                r["pool_mib"] = round(_pool_bytes(client) / 2**20, 1)
                if step % 20 == 0:
                    print(f"  {name} step {step}: prompt {r['prompt']} cached {r['cached']} kv {r['kv_tokens']} "
                          f"pools {r['pool_mib']:.0f} MiB {time.perf_counter() - t0:.0f}s", file=sys.stderr)  # fmt: skip
        results["arms"][name] = {**arm.summary(time.perf_counter() - t0), "refused": refused}
        if args.out is not None:  # after every arm: a long run stopped half-way keeps what it measured
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'arm':14} {'steps':>5} {'refused':>7} {'KV hit':>7} {'prefill/step':>12} {'prefill total':>13} {'max KV':>7} "
          f"{'pools MiB':>9} {'s':>6}")  # fmt: skip
    for name, r in results["arms"].items():
        print(f"{name:14} {r['steps']:>5} {r['refused']:>7} {r['cache_hit']:>7.1%} {r['prefilled_per_step_median']:>12} "
              f"{r['prefilled_total']:>13} {r['max_kv_tokens']:>7} {r['max_pool_mib']:>9.0f} {r['seconds']:>6}")  # fmt: skip
    return results


SERVICES = ["billing", "search", "mailer", "reports", "gateway", "metrics", "auth", "storage", "backup", "ledger"]


def recall(args: argparse.Namespace) -> dict[str, Any]:
    """Facts stated in early tool results, asked about at the end of a long run, in each arm."""
    import random

    from fastapi.testclient import TestClient

    from longkv.agent.state import result_header
    from longkv.agent.toolkit import ToolContext, ToolError
    from longkv.agent.tools import finish as finish_tool
    from longkv.agent.tools import rank_results
    from longkv.agent.tools import recall as recall_tool
    from longkv.server.app import create_app

    llm, cfg, window = _serve(args)
    rng = random.Random(args.seed)
    outputs = tool_outputs(llm, args.steps)
    facts = []
    for i in range(args.facts):
        step = 2 + 4 * i
        name, code = SERVICES[i % len(SERVICES)], str(rng.randrange(100_000, 1_000_000))
        outputs[step] = (f"$ cat config/{name}.env\n# settings of the {name} service\nHOST={name}.internal\n"
                         f"PORT={rng.randrange(2000, 9000)}\nTOKEN={code}\nRETRIES=3\n")  # fmt: skip
        facts.append({"step": step, "result": step + 1, "name": name, "code": code})
    # as longkv agent keeps them: (the call, the text), and in the context numbered [result N]
    log = [(json.dumps({"command": o.split("\n")[0].lstrip("$ ")}), o) for o in outputs]
    outputs = [result_header(i + 1) + o for i, o in enumerate(outputs)]
    tools = [recall_tool.schema(), finish_tool.schema()]
    forced = {"type": "function", "function": {"name": "recall"}}
    finish = {"type": "function", "function": {"name": "finish"}}
    results: dict[str, Any] = {"model": args.model, "window": window, "steps": args.steps, "facts": facts, "arms": {}}
    for name in args.arms:
        with TestClient(create_app(llm, cfg)) as client:
            arm = Arm(client, llm, name, window, tools)
            t0 = time.perf_counter()
            for step in range(args.steps):
                arm.step(outputs[step], "Next: " + log[step][1].split("\n")[0].lstrip("$ "))
                if step % 20 == 0:
                    r = arm.rows[-1]
                    print(f"  {name} step {step}: prompt {r['prompt']} kv {r['kv_tokens']} {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            seconds = time.perf_counter() - t0
            memory = name == "kv-memory"
            history = arm.history()
            answers = []
            for f in facts:
                q = {"role": "user", "content": f"What is the TOKEN in config/{f['name']}.env? Reply with the number only."}
                direct = arm.ask([*history, q], memory, 16, eos=True, **arm.offer)["choices"][0]["message"]["content"]
                row = {**f, "direct": direct, "direct_ok": f["code"] in direct}
                if memory:  # the same question with recall: the model writes the query, then answers from the result
                    call = arm.ask([*history, q], True, 32, eos=True, tools=tools, tool_choice=forced)["choices"][0]["message"]
                    tc = call["tool_calls"][0]
                    query = str(json.loads(tc["function"]["arguments"]).get("query", ""))
                    try:  # what longkv agent's recall answers (the room of one result: its 8 K-window, 512-token-reply figure)
                        text = recall_tool.call(ToolContext(Path("."), None, log, limit=max(500, (window - 512) // 4)), {"query": query})
                        got = [int(x) for x in re.findall(r"^\[result (\d+)\]$", text, re.M)] or rank_results(log, query)[:1]
                    except ToolError as exc:
                        got, text = [], f"error: {exc}"
                    back = [*history, q, {"role": "assistant", "content": None, "tool_calls": [tc]},
                            {"role": "tool", "tool_call_id": tc["id"], "content": result_header(len(outputs) + 1) + text}]  # fmt: skip
                    done = arm.ask(back, True, 96, eos=True, tools=tools, tool_choice=finish)["choices"][0]
                    calls = done["message"]["tool_calls"]  # none when the call was cut at max_tokens
                    ans = str(json.loads(calls[0]["function"]["arguments"]).get("answer", "")) if calls else str(done["message"]["content"])
                    row.update(query=query, recalled=got, recalled_ok=f["result"] in got, recall=ans, recall_ok=f["code"] in ans)
                answers.append(row)
                print(f"  {name} {f['name']} ({f['code']}): direct {direct!r}" + (f", recall({row['query']!r}) -> {row['recalled']}: {row['recall']!r}" if memory else ""), file=sys.stderr)
        res = {**arm.summary(seconds), "answers": answers, "direct_ok": sum(a["direct_ok"] for a in answers)}
        if memory:
            res.update(recall_ok=sum(a["recall_ok"] for a in answers), recalled_ok=sum(a["recalled_ok"] for a in answers))
        results["arms"][name] = res
        if args.out is not None:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    k = len(facts)
    print(f"\n{'arm':22} {'answered':>8} {'prefill total':>13} {'max KV':>7} {'s':>6}")
    for name, r in results["arms"].items():
        print(f"{name:22} {r['direct_ok']:>5}/{k:<2} {r['prefilled_total']:>13} {r['max_kv_tokens']:>7} {r['seconds']:>6}")
        if "recall_ok" in r:
            print(f"{name + ' + recall':22} {r['recall_ok']:>5}/{k:<2} (the fact's result among those recalled {r['recalled_ok']}/{k})")
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
    c = sub.add_parser("recall", help="facts from early tool results asked at the end: kv-memory with and without recall vs text arms")
    c.add_argument("--steps", type=int, default=130)
    c.add_argument("--facts", type=int, default=6, help="facts, in the tool results of steps 2, 6, 10, ...")
    c.add_argument("--seed", type=int, default=0)
    for p in (h, c):
        p.add_argument("--arms", nargs="+", default=["kv-memory", "text-window", "text-summary"])
        p.add_argument("--window", type=int, default=None, help="run the model as if its window were this many tokens")
    r = sub.add_parser("resume", help="a session saved and read back vs prefilled again")
    r.add_argument("--tokens", type=int, default=16384)
    for p in (h, c, r):
        p.add_argument("--model", required=True)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = {"horizon": horizon, "recall": recall, "resume": resume}[args.cmd](args)
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
