"""Decode speed of KV policies against dense attention, in one process.

Every policy reads the same prompt (a slice of a book from ``../shared/data/books``) with
``LLM.generate`` and decodes ``--new`` tokens greedily (end of text ignored); the rounds go
policy after policy, ``--repeats`` times, and the median decode tokens/s of each is printed with
its ratio to dense's. An eviction policy compresses the prompt to its budget and renumbers the
keys it kept (``positions=contiguous``, the default): the decode kernel reads them in place and
turns the query once per run of keys with one shift; ``positions=original`` keeps them where
they were (no turn).

    python benchmarks/policy_decode.py --model "$(../shared/models/get-model smollm2-135m)" \\
        --tokens 3000 --out runs/policy-decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BOOKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "books"
POLICIES = ["dense", "streaming:budget=1024", "snapkv:budget=1024", "h2o:budget=1024", "snapkv:budget=1024,positions=original"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--policies", nargs="+", default=POLICIES, help="policy specs; dense first gives the ratios")
    ap.add_argument("--tokens", type=int, default=3000, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens decoded")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--book", default="alice-in-wonderland.txt", help="a file of ../shared/data/books")
    ap.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = ap.parse_args()
    from longkv import LLM

    path = BOOKS / args.book
    if not path.is_file():
        raise SystemExit(f"no book at {path}: pass --book with a file of {BOOKS}")
    llm = LLM(args.model, dtype="bfloat16", threads=args.threads)
    ids = llm.encode(path.read_text(encoding="utf-8")[20000:])[: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.book} has {len(ids)} tokens past its first 20,000 characters, under --tokens {args.tokens}")
    runs: dict[str, list[float]] = {p: [] for p in args.policies}
    for r in range(args.repeats):
        for p in args.policies:
            g = llm.generate(ids, max_new_tokens=args.new, ignore_eos=True, policy=p)
            runs[p].append(round(g.stats.decode_tok_s, 1))
            print(f"  round {r + 1}: {p}: {runs[p][-1]} tok/s", flush=True)
    base = statistics.median(runs[args.policies[0]])
    print(f"\n{'policy':42} {'decode tok/s':>12} {'vs ' + args.policies[0]:>10}")
    for p, xs in runs.items():
        m = statistics.median(xs)
        print(f"{p:42} {m:>12.1f} {m / base:>9.2f}x")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "tokens": args.tokens, "new": args.new, "repeats": args.repeats, "runs": runs}
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
