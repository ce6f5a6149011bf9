"""The competitor row for batching: llama.cpp's ``llama-server`` with N parallel slots, N concurrent clients.

Same workload as ``benchmarks/batching.py`` (N different 2048-token book passages, 128
tokens each, EOS ignored, greedy), sent at once to ``/completion`` as token ids
(tokenized by the server itself). Each prompt is first prefilled into its own slot
(``cache_prompt``, one token generated), then the N requests are sent again at once:
aggregate decode tokens/s = tokens generated / wall time of that second round (the
server re-reads at most a token of each cached prompt, ``reprocessed_prompt_tokens``).

``llama-server`` builds from the llama.cpp sources vendored in the llama-cpp-python
sdist (cmake, ``--target llama-server``); pass its path with ``--server``.

    python benchmarks/llama_server.py --server /tmp/llama-server/llama-server \\
        --model $(../shared/models/get-model smollm2-135m) --clients 1,2,4 --out runs/llama-server.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "data" / "books" / "moby-dick.txt"


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_round(base: str, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """N concurrent requests after their prompts were cached in N slots: the wall time is decode time."""
    body = {"ignore_eos": True, "temperature": 0, "cache_prompt": True}
    with ThreadPoolExecutor(len(prompts)) as pool:  # prefill every prompt into its own slot first
        list(pool.map(lambda p: _post(f"{base}/completion", {**body, "prompt": p, "n_predict": 1}), prompts))
        t0 = time.perf_counter()
        outs = list(pool.map(lambda p: _post(f"{base}/completion", {**body, "prompt": p, "n_predict": new_tokens}), prompts))
        wall = time.perf_counter() - t0
    tokens = sum(o["timings"]["predicted_n"] for o in outs)
    return {
        "clients": len(prompts),
        "decode_tok_s": round(tokens / wall, 1),
        "per_request_tok_s": [round(o["timings"]["predicted_per_second"], 1) for o in outs],
        "reprocessed_prompt_tokens": [o["timings"]["prompt_n"] for o in outs],
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="path of the llama-server binary")
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    slots = max(clients)
    port = _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(args.server).parent)}
    ctx = slots * (args.prompt_tokens + args.new_tokens + 64)
    cmd = [args.server, "-m", args.model, "--port", str(port), "-np", str(slots), "-c", str(ctx), "-t", str(args.threads),
           "-tb", str(args.threads), "-b", "512", "--no-ui"]  # fmt: skip
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if _post(f"{base}/tokenize", {"content": "hi"}, timeout=5):
                    break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited with {proc.returncode}: see {log.name}") from None
                time.sleep(0.5)
        text = BOOK.read_text()[20_000:]
        ids = _post(f"{base}/tokenize", {"content": text[: 40 * args.prompt_tokens * slots]})["tokens"]
        prompts = [ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens] for i in range(slots)]
        run_round(base, prompts[:1], 8)  # warm-up
        rows = []
        for n in clients:
            rows.append(run_round(base, prompts[:n], args.new_tokens))
            print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    one = rows[0]["decode_tok_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\nllama-server -np {slots}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each")
    print("| clients | decode tok/s | vs 1 client | wall s |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / one:.2f}x" if one else "-"
        print(f"| {r['clients']} | {r['decode_tok_s']} | {ratio} | {r['wall_s']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"server": args.server, "model": args.model, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
