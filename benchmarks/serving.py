"""Serving benchmark: what the prefix cache saves on long multi-turn workloads.

Two workloads, each run against one ``longkv serve`` process with the prefix
cache on and then off (per request, ``"longkv": {"cache": false}``), through the
official ``openai`` client:

* chat: a document of ``--doc-tokens`` tokens (book text) followed by ``--turns``
  questions, one per turn, each turn carrying the whole conversation so far;
* loop: ``--steps`` steps of a loop whose history grows every step (an
  observation of book text in, a short action out), as tool-calling programs do.

The cache-off run replays exactly the conversations of the cache-on run (same
prompts), so both prefill the same tokens unless the cache serves them.
Optionally (``--llama-cpp``) the same replay runs against ``llama_cpp.server``
(llama-cpp-python, which reuses the previous request's KV for a common prefix).

Prints a table and writes JSON (``--out``). Greedy decoding; times are wall
seconds per request as the client sees them. Example::

    python benchmarks/serving.py --doc-tokens 6000 --turns 20 --steps 50 --out runs/serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Who is telling this story?", "Where does the story take place?", "Name one character and describe them.",
    "What is the mood of the text?", "What happens first?", "What does the narrator want?",
    "Which places are mentioned?", "Quote one memorable phrase.", "What is the weather like?",
    "Who speaks the most?", "What is surprising in the text?", "What might happen next?",
    "What objects are described?", "How does the narrator feel about the sea?", "Summarise the last paragraph.",
    "What time of day is it?", "Is anyone in danger?", "What is the main conflict?",
    "Give the text a title.", "Summarise everything in one sentence.",
]  # fmt: skip


@dataclass
class Request:
    prompt_tokens: int
    cached_tokens: int | None  # None: the server does not report it (llama_cpp.server)
    completion_tokens: int
    wall_s: float


@dataclass
class Run:
    """One workload under one server setting."""

    workload: str
    setting: str
    requests: list[Request] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        rs = self.requests
        prompt = sum(r.prompt_tokens for r in rs)
        known = all(r.cached_tokens is not None for r in rs)
        cached = sum(r.cached_tokens or 0 for r in rs)
        later = rs[1:]
        later_prompt = sum(r.prompt_tokens for r in later)
        return {
            "requests": len(rs),
            "prompt_tokens": prompt,
            "prefilled_tokens": prompt - cached if known else None,
            "completion_tokens": sum(r.completion_tokens for r in rs),
            "cached_fraction_from_request_2": (sum(r.cached_tokens or 0 for r in later) / later_prompt) if later_prompt and known else None,
            "wall_s": sum(r.wall_s for r in rs),
            "first_request_s": rs[0].wall_s if rs else 0.0,
            "later_request_median_s": sorted(r.wall_s for r in later)[len(later) // 2] if later else 0.0,
        }


def smollm2() -> str:
    getter = ROOT.parent / "shared" / "models" / "get-model"
    return subprocess.run([str(getter), "smollm2-135m"], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def document(path: Path, n_tokens: int, tokenizer) -> str:  # type: ignore[no-untyped-def]
    """The first ``n_tokens`` tokens of the book (after its first 5,000 characters), as text."""
    text = path.read_text()[5000 : 5000 + n_tokens * 8]
    ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return str(tokenizer.decode(ids))


def call(client, model: str, messages: list[dict], max_tokens: int, extra: dict | None) -> tuple[str, Request]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra)
    wall = time.perf_counter() - t0
    details = getattr(r.usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return r.choices[0].message.content or "", Request(r.usage.prompt_tokens, cached, r.usage.completion_tokens, wall)


def chat_workload(doc: str, turns: int) -> tuple[list[dict], list[str]]:
    """First message and the follow-up questions of the chat workload."""
    first = {"role": "user", "content": f"Read this text.\n\n{doc}\n\nQuestion: {QUESTIONS[0]}"}
    return [first], [QUESTIONS[i % len(QUESTIONS)] for i in range(1, turns)]


def loop_observations(book: str, steps: int, chars: int = 240) -> list[str]:
    return [f"Observation {i + 1}: {book[20_000 + i * chars : 20_000 + (i + 1) * chars]}" for i in range(steps)]


LOOP_SYSTEM = "You read a book page by page. After each observation, reply with one short action."


def run_live(client, model: str, workload: str, first: list[dict], follow: list[str], max_tokens: int, extra: dict) -> tuple[Run, list[list[dict]]]:  # type: ignore[no-untyped-def]
    """Run a growing conversation; return the run and every prompt sent (for replays)."""
    run, prompts = Run(workload, "longkv cache on"), []
    messages = list(first)
    for i in range(len(follow) + 1):
        prompts.append(list(messages))
        answer, req = call(client, model, messages, max_tokens, extra)
        run.requests.append(req)
        print(f"  {workload} {i + 1:3d}: prompt {req.prompt_tokens:6d}  cached {req.cached_tokens!s:>6}  {req.wall_s:6.2f} s", flush=True)
        if i < len(follow):
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow[i]}]
    return run, prompts


def replay(client, model: str, workload: str, setting: str, prompts: list[list[dict]], max_tokens: int, extra: dict | None) -> Run:  # type: ignore[no-untyped-def]
    run = Run(workload, setting)
    for i, messages in enumerate(prompts):
        _, req = call(client, model, messages, max_tokens, extra)
        run.requests.append(req)
        print(f"  {workload} {i + 1:3d}: prompt {req.prompt_tokens:6d}  cached {req.cached_tokens!s:>6}  {req.wall_s:6.2f} s  [{setting}]", flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF path (default: SmolLM2-135M from ../shared)")
    ap.add_argument("--book", default=str(ROOT.parent / "shared" / "data" / "books" / "moby-dick.txt"))
    ap.add_argument("--doc-tokens", type=int, default=6000, help="document tokens of the chat workload")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50, help="steps of the growing-history loop (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=24, help="answer length per chat turn")
    ap.add_argument("--loop-max-tokens", type=int, default=16)
    ap.add_argument("--obs-chars", type=int, default=240, help="characters of book text per loop observation")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-off", action="store_true", help="skip the cache-off replays")
    ap.add_argument("--llama-cpp", action="store_true", help="also replay against llama_cpp.server")
    ap.add_argument("--out", default="runs/serving.json")
    args = ap.parse_args()

    import openai
    from transformers import AutoTokenizer

    from longkv.server.launch import ServerProcess

    model = args.model or smollm2()
    book = Path(args.book).read_text()
    tok = AutoTokenizer.from_pretrained(str(Path(model).parent), gguf_file=Path(model).name)
    doc = document(Path(args.book), args.doc_tokens, tok)
    runs: list[Run] = []
    server_args = ["--dtype", args.dtype, "--log-level", "warning", "--cache-mib", "4096"]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    with ServerProcess(model, *server_args, timeout=600) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
        model_id = client.models.list().data[0].id
        salt = {"longkv": {"cache_salt": uuid.uuid4().hex}}
        call(client, model_id, [{"role": "user", "content": "Hello"}], 4, {"longkv": {"cache": False}})  # warm-up

        print(f"chat: {args.doc_tokens}-token document, {args.turns} turns")
        first, follow = chat_workload(doc, args.turns)
        run, chat_prompts = run_live(client, model_id, "chat", first, follow, args.max_tokens, salt)
        runs.append(run)
        loop_prompts: list[list[dict]] = []
        if args.steps:
            print(f"loop: {args.steps} steps")
            obs = loop_observations(book, args.steps, args.obs_chars)
            first = [{"role": "system", "content": LOOP_SYSTEM}, {"role": "user", "content": obs[0]}]
            run, loop_prompts = run_live(client, model_id, "loop", first, obs[1:], args.loop_max_tokens, salt)
            runs.append(run)
        if not args.no_off:
            cold = {"longkv": {"cache": False}}
            runs.append(replay(client, model_id, "chat", "longkv cache off", chat_prompts, args.max_tokens, cold))
            if loop_prompts:
                runs.append(replay(client, model_id, "loop", "longkv cache off", loop_prompts, args.loop_max_tokens, cold))
    if args.llama_cpp:
        port_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", "8192"]
        if args.threads:
            port_cmd += ["--n_threads", str(args.threads)]
        with ServerProcess(model, command=port_cmd, timeout=600, health_path="/v1/models") as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=3600)
            model_id = client.models.list().data[0].id
            runs.append(replay(client, model_id, "chat", "llama_cpp.server", chat_prompts, args.max_tokens, None))
            if loop_prompts:
                runs.append(replay(client, model_id, "loop", "llama_cpp.server", loop_prompts, args.loop_max_tokens, None))

    print()
    header = f"{'workload':8} {'server':20} {'requests':>8} {'prompt tok':>10} {'prefilled':>10} {'cached 2+':>9} {'wall s':>8} {'1st s':>7} {'later med s':>11}"
    print(header)
    print("-" * len(header))
    table: list[dict[str, Any]] = []
    for r in runs:
        s = r.summary()
        table.append({"workload": r.workload, "setting": r.setting, **s})
        prefilled = "n/a" if s["prefilled_tokens"] is None else str(s["prefilled_tokens"])
        frac = s["cached_fraction_from_request_2"]
        cached = "n/a" if frac is None else f"{100 * frac:.1f}%"
        print(
            f"{r.workload:8} {r.setting:20} {s['requests']:8d} {s['prompt_tokens']:10d} {prefilled:>10} "
            f"{cached:>9} {s['wall_s']:8.1f} {s['first_request_s']:7.2f} {s['later_request_median_s']:11.2f}"
        )
    for workload in ("chat", "loop"):
        on = next((t for t in table if t["workload"] == workload and t["setting"] == "longkv cache on"), None)
        off = next((t for t in table if t["workload"] == workload and t["setting"] == "longkv cache off"), None)
        if on and off and on["wall_s"]:
            ratio = off["wall_s"] / on["wall_s"]
            fewer = (off["prefilled_tokens"] or 0) / max(on["prefilled_tokens"] or 0, 1)
            print(f"{workload}: cache on takes {ratio:.1f}x less wall time than off and prefills {fewer:.1f}x fewer tokens")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model,
        "dtype": args.dtype,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "args": vars(args),
    }
    out.write_text(json.dumps({"meta": meta, "summary": table, "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
