"""Decode weight formats (int4 / int8 / mixed / none) side by side: decode perplexity, greedy agreement, speed.

Prefill always uses the compute dtype; the formats differ only in the weights a
decode step (a few rows) reads. So each format is scored where it acts:

* **decode perplexity**: a ``--context``-token book passage is prefilled, then the
  next ``--tokens`` tokens are fed one by one as decode steps (teacher forcing)
  and their negative log-likelihood averaged: exp(mean NLL), against ``none``;
* **greedy agreement**: ``--gen`` greedy tokens after a chat question; how many
  leading tokens equal the ``none`` path's;
* **decode tokens/s** over those generated tokens.

    python benchmarks/weights.py --model $(../shared/models/get-model smollm2-135m) --out benchmarks/results/weights-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longkv import LLM  # noqa: E402
from longkv.bench.ppl import streaming_nll  # noqa: E402
from longkv.engine.runner import Runner  # noqa: E402
from longkv.policies import DensePolicy  # noqa: E402

BOOK = ROOT.parent / "shared" / "data" / "books" / "moby-dick.txt"
QUESTION = "Explain in a few sentences why whales were hunted in the nineteenth century."


def greedy(llm: LLM, n: int) -> tuple[list[int], float]:
    runner = Runner(llm.model, DensePolicy(), llm.engine_config)
    tok = llm.tokenizer
    chat = [{"role": "user", "content": QUESTION}]
    # a file without a chat template (Gemma 3 270M's GGUF) gets the question as plain text
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) if getattr(tok, "chat_template", None) else QUESTION
    prompt = llm.encode(text)
    seq = runner.new_sequence(len(prompt) + n)
    logits = runner.prefill(seq, prompt)
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = runner.decode(seq, out[-1])
    return out, n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--formats", default="none,int8,mixed,int4", help="comma-separated; the first is the reference")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    ref_tokens: list[int] | None = None
    ref_ppl = None
    for fmt in args.formats.split(","):
        llm = LLM(args.model, threads=args.threads, weights=fmt)
        ids = llm.encode(BOOK.read_text()[50_000:])[: args.context + args.tokens]
        ppl = streaming_nll(llm, ids, args.context, "dense").ppl
        tokens, tok_s = greedy(llm, args.gen)
        if ref_tokens is None:
            ref_tokens, ref_ppl = tokens, ppl
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        rows.append({"weights": fmt, "decode_ppl": round(ppl, 3), "ppl_vs_first": round(ppl / ref_ppl, 4),
                     "greedy_same_prefix": same, "gen": args.gen, "decode_tok_s": round(tok_s, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    print(f"\n| weights | decode ppl ({args.tokens} tokens after {args.context}) | vs {rows[0]['weights']} | greedy tokens equal to {rows[0]['weights']} | decode tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['decode_ppl']} | {r['ppl_vs_first']:.3f}x | {r['greedy_same_prefix']} / {r['gen']} | {r['decode_tok_s']} |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
