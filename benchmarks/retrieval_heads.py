"""Find a model's retrieval heads: the query heads that point at a planted fact far back in the text.

Builds ``--contexts`` texts of ``--length`` tokens of real book text
(../shared/data/books), each holding ``--needles`` facts of different wording
("The code to open the vault is NNNNNN.", ...) at depths spread over the text.
Every context is prefilled once (sinks + local window, as ``block_topk`` reads
it); then each fact's question is run and, for every (layer, query head), the
share of attention its question queries would give each page is read (the
rows ``block_topk`` rates pages with). A head "finds" a fact when the fact's
page is among its ``--hit-rank`` best pages (mean share over the queries).

Heads that find the fact in at least ``--min-share`` of the questions are the
retrieval heads (at most ``--max-heads``, best first). They depend on the model,
not on the text: calibrate on text and seeds you do not evaluate on. The
printed ``heads=...`` knob goes to ``--policy "block_topk:heads=..."``; the
printed table line goes into ``longkv/policies/retrieval_heads.py`` so that
``heads=auto`` picks them for every model of that shape.

    nice -n 10 python benchmarks/retrieval_heads.py --length 16384 --contexts 3 --needles 5 --seed 1000 \\
        --out benchmarks/results/retrieval_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from longctx import BOOKS, MODEL, capture_rows, cut_back, haystack, make_multi

from longkv import LLM
from longkv.engine.runner import Runner
from longkv.policies import BlockTopKPolicy
from longkv.policies.retrieval_heads import fingerprint

ROOT = Path(__file__).resolve().parents[1]


def head_ranks(rows: list[torch.Tensor], n_heads: int, needle: list[int]) -> torch.Tensor:
    """Per layer (Hkv * G * T, C) page shares -> (L, H) rank of the best needle page for each query head
    (1 = its first choice), by the head's mean share over its T queries."""
    out = []
    for z in rows:
        per_head = z.float().reshape(n_heads, -1, z.shape[-1]).mean(1)  # (H, C), rows head-major
        best = per_head[:, needle].amax(-1, keepdim=True)
        out.append((per_head > best).sum(-1) + 1)
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL), help="GGUF file or model folder")
    ap.add_argument("--length", type=int, default=16384, help="tokens per context")
    ap.add_argument("--contexts", type=int, default=3, help="texts, each prefilled once")
    ap.add_argument("--needles", type=int, default=5, help="facts (and questions) per text")
    ap.add_argument("--seed", type=int, default=1000, help="text stretches and numbers (use seeds you do not evaluate on)")
    ap.add_argument("--hit-rank", type=int, default=2, help="a head finds a fact when its page ranks this high or better")
    ap.add_argument("--min-share", type=float, default=0.75, help="share of questions a retrieval head must find")
    ap.add_argument("--max-heads", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_heads.json"))
    args = ap.parse_args()

    llm = LLM(model=args.model, dtype="bfloat16")
    cfg, ps = llm.config, llm.engine_config.page_size
    base = BlockTopKPolicy(heads="all", reencode=False)
    books = sorted(BOOKS.glob("*.txt"))
    if not books:
        raise SystemExit(f"no books in {BOOKS}: this benchmark needs ../shared/data/books")
    rng = random.Random(args.seed)
    depths = [(i + 0.5) / args.needles for i in range(args.needles)]
    ranks: list[torch.Tensor] = []  # (L, H) per question
    t0 = time.perf_counter()
    for c in range(args.contexts):
        first = (args.seed + c) % len(books)
        sample = make_multi(llm, haystack(llm, books, first, args.length, rng), args.length, depths, rng)
        ctx = sample["context"]
        runner = Runner(llm.model, dataclasses.replace(base, topk=0), llm.engine_config)
        seq = runner.new_sequence(len(ctx) + 64)
        runner.prefill(seq, ctx)
        for tail, (lo, hi) in zip(sample["tails"], sample["needle_tokens"], strict=True):
            cut_back(seq, len(ctx))
            pol, rows = capture_rows(base)
            Runner(llm.model, pol, llm.engine_config).ask(seq, tail)
            cand = seq.selection.candidates.tolist()
            needle = [cand.index(p) for p in range(lo // ps, (hi - 1) // ps + 1) if p in cand]
            if needle:
                ranks.append(head_ranks(rows, cfg.n_heads, needle))
        print(f"context {c + 1}/{args.contexts}: {len(ctx)} tokens, {len(ranks)} questions so far "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not ranks:
        raise SystemExit("no question's fact lay in a candidate page: use longer contexts (--length)")
    r = torch.stack(ranks)  # (Q, L, H)
    found = (r <= args.hit_rank).float().mean(0)  # (L, H)
    order = sorted(((float(found[i, h]), -float(r[:, i, h].float().median()), i, h)
                    for i in range(cfg.n_layers) for h in range(cfg.n_heads)), reverse=True)
    heads = [(i, h) for share, _, i, h in order if share >= args.min_share][: args.max_heads]
    table = [{"head": f"{i}.{h}", "found": round(share, 3), "median_rank": -med} for share, med, i, h in order[:16]]
    knob = "+".join(f"{i}.{h}" for i, h in heads)
    print(f"{len(ranks)} questions; best heads (share of questions whose fact page they rank <= {args.hit_rank}):")
    for row in table:
        print(f"  {row['head']:>6}  {row['found']:.2f}  median rank {row['median_rank']:.0f}")
    print(f"retrieval heads: heads={knob or '(none: keep heads=all)'}")
    print(f'table line: "{fingerprint(cfg)}": {tuple(heads)},')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": cfg.name, "fingerprint": fingerprint(cfg),
                               "questions": len(ranks), "heads": knob, "best": table}, indent=1))


if __name__ == "__main__":
    main()
