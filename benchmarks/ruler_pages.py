"""Where block_topk's page scores put the needles of RULER samples: the data that chose ``margin``.

For each sample (the bench's own generators, ``longkv bench ruler``, with a seed of your
choice: take another than the one you score on) the prompt is read by block_topk with one
page (``margin=0``), and the page scores at the question are kept. Then, for each margin, it
counts the needle pages of the multi-fact tasks (niah_multivalue, niah_multiquery) that the
margin would read (a page counts when it or a neighbour is read, as ``expand=1`` reads them;
needles inside the local window are left out), and the pages read beyond the first for the
single-answer tasks, where every further page is a look-alike the model may copy from.

    python benchmarks/ruler_pages.py --model smollm2-135m --seed 1 --samples 8 \\
        --out benchmarks/results/ruler-pages-smollm2-8k-seed1.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from compression import number_span  # token indices of a number in a text

import longkv.policies.block_topk as block_topk
from longkv import LLM
from longkv.bench.ruler import RulerTask
from longkv.bench.tasks import PromptFormat, load_haystack

MULTI = ("niah_multivalue", "niah_multiquery")


def resolve_model(name: str) -> str:
    return name if Path(name).exists() else subprocess.check_output(["../shared/models/get-model", name], text=True).strip()


def needle_pages(llm: LLM, prompt: str, refs: list[str], page: int) -> list[list[int]]:
    """Pages (of ``page`` tokens) holding each reference number, one list per number found."""
    spans = [number_span(llm, prompt, ref) for ref in refs]
    return [sorted({t // page for t in span}) for span in spans if span]


def pages_read(scores: list[float], margin: float, most: int) -> int:
    """How many pages block_topk's own rule reads (one page, then those within ``margin``) for ``scores``, best first."""
    return block_topk.BlockTopKPolicy(margin=margin, topk_max=most).close_pages(torch.tensor(scores), 1, log_units=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF path or a name for ../shared/models/get-model")
    ap.add_argument("--tasks", default="niah_multikey_1,niah_multivalue,niah_multiquery,niah_single_2")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1, help="sample seed (the bench scores seed 0: choose on another)")
    ap.add_argument("--margins", default="0,0.3,0.5,0.8,1.0")
    ap.add_argument("--topk-max", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/ruler-pages.json")
    args = ap.parse_args()

    llm = LLM(resolve_model(args.model), dtype="bfloat16")
    fmt, hay, page = PromptFormat(llm.tokenizer), load_haystack(None), llm.engine_config.page_size
    seen: dict[str, torch.Tensor] = {}
    top_pages = block_topk.top_pages

    def keep(cand: torch.Tensor, scores: torch.Tensor, k: int, expand: int = 0) -> torch.Tensor:
        if scores.shape[0] == 1:  # the shared selection at the question
            seen["cand"], seen["score"] = cand.clone(), scores[0].float().clone()
        return top_pages(cand, scores, k, expand)

    block_topk.top_pages = keep  # type: ignore[assignment]
    rows = []
    for name in args.tasks.split(","):
        task = RulerTask(name, hay)
        for i in range(args.samples):
            s = task.make(fmt, args.length, i, args.seed)
            seen.clear()
            llm.generate(s.prompt, max_new_tokens=1, policy="block_topk:margin=0")
            order = torch.argsort(seen["score"], descending=True)
            rows.append({
                "task": name, "sample": i, "ranked": seen["cand"][order].tolist(), "scores": seen["score"][order].tolist(),
                "needles": [ps for ps in needle_pages(llm, s.prompt, s.references, page) if any(p in seen["cand"].tolist() for p in ps)],
            })  # fmt: skip
            print(name, i, [round(rows[-1]["scores"][0] - v, 2) for v in rows[-1]["scores"][:5]], flush=True)
    table = []
    for margin in (float(m) for m in args.margins.split(",")):
        got = total = extra = 0
        for r in rows:
            k = pages_read(r["scores"], margin, args.topk_max)
            if r["task"] in MULTI:
                pages = {p + e for p in r["ranked"][:k] for e in (-1, 0, 1)}  # with one neighbour each side (expand=1)
                total += len(r["needles"])
                got += sum(any(p in pages for p in ps) for ps in r["needles"])
            else:
                extra += k - 1
        table.append({"margin": margin, "multi_fact_pages_read": got, "multi_fact_pages": total, "single_answer_extra_pages": extra})
        print(f"margin {margin:g}: multi-fact needle pages read {got}/{total}, pages beyond the first for single answers {extra}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "table": table, "samples": rows}, indent=1))


if __name__ == "__main__":
    main()
