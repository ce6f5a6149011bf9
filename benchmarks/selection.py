"""Compare page-selection rules offline on real questions: which rows of the question choose the pages.

Reads the files ``questions.py --dump-rows DIR`` writes (per sample: the share
of attention every (layer, query head, query) row at the question gives each
candidate page, ``(L, Hq, T, C)``, where the evidence lies and which of the
``T`` queries are the question's own tokens) and scores rules by page recall:
the rank of the evidence's best page, and whether a page holding the evidence
is read when the top ``k`` pages are taken with one neighbour on each side
(``expand=1``, what block_topk reads).

Rules: ``needle heads`` (the model's calibrated retrieval heads, mean log share
over the queries), ``every row`` (the mean of each page's 10 best shares over
every row), each over the last 32 queries and over the question's own tokens;
the needle heads also over the question + the template's tail and over the last
32 without the tail; and ``real-question heads``: the ``--heads`` heads that rank
the evidence's page first most often on the calibration half of the questions.
The halves are fixed by question id (every other question of ``questions.json``),
so a rule chosen on one half is judged on the other.

    python benchmarks/selection.py /tmp/rows-qwen --out benchmarks/results/selection-qwen05-8k.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from questions import load_questions

from longkv.policies.retrieval_heads import KNOWN

EPS = 1e-6


def load(folder: Path) -> list[dict]:
    return [torch.load(p) for p in sorted(folder.glob("*.pt"))]


def split_of(qid: str, order: dict[str, int]) -> str:
    return "calibration" if order[qid] % 2 == 0 else "held"


def query_rows(d: dict, which: str) -> slice:
    t = d["rows"].shape[2]
    a, b = d["question"]
    if which == "question":
        return slice(a, b)
    if which == "question+tail":
        return slice(a, t)
    if which == "32-tail":
        return slice(t - 32, b)
    return slice(t - int(which), t)  # the last N queries


def by_heads(d: dict, heads: list[tuple[int, int]], which: str) -> torch.Tensor:
    """(C,) mean over ``heads`` of the log of each head's mean share over the chosen queries."""
    r = d["rows"][:, :, query_rows(d, which)].float().mean(2)  # (L, Hq, C)
    return torch.stack([r[layer, h].clamp_min(EPS).log() for layer, h in heads]).mean(0)


def by_votes(d: dict, which: str, votes: int = 10) -> torch.Tensor:
    """(C,) mean of each page's ``votes`` best shares over every (layer, head, query) row."""
    r = d["rows"][:, :, query_rows(d, which)].float().flatten(0, 2)  # (R, C)
    return r.topk(min(votes, r.shape[0]), dim=0).values.mean(0)


def rank_and_hits(d: dict, score: torch.Tensor, ks: tuple[int, ...]) -> tuple[int, dict[int, bool]]:
    """Rank (1 = first) of the evidence's best page, and for each k whether top-k pages with one neighbour
    on each side (block_topk's ``expand=1``) hold the evidence."""
    cand = d["candidates"].tolist()
    pos = {p: i for i, p in enumerate(cand)}
    ev = [pos[p] for p in d["evidence_pages"] if p in pos]
    order = score.argsort(descending=True).tolist()
    rank = min(order.index(i) for i in ev) + 1
    hits = {}
    for k in ks:
        read = {j for i in order[:k] for j in (i - 1, i, i + 1)}
        hits[k] = any(i in read for i in ev)
    return rank, hits


def head_hit_rate(samples: list[dict], which: str) -> torch.Tensor:
    """(L, Hq) share of ``samples`` where the head ranks an evidence page first (mean share over the queries)."""
    total = None
    for d in samples:
        r = d["rows"][:, :, query_rows(d, which)].float().mean(2)  # (L, Hq, C)
        pos = {p: i for i, p in enumerate(d["candidates"].tolist())}
        ev = [pos[p] for p in d["evidence_pages"] if p in pos]
        first = torch.isin(r.argmax(-1), torch.tensor(ev)).float()
        total = first if total is None else total + first
    assert total is not None
    return total / len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a questions.py --dump-rows folder")
    ap.add_argument("--heads", type=int, default=8, help="real-question heads chosen on the calibration half")
    ap.add_argument("--out", type=Path, help="write the table as JSON")
    args = ap.parse_args()

    order = {q["id"]: i for i, q in enumerate(load_questions())}
    samples = [d for d in load(args.folder) if any(p in set(d["candidates"].tolist()) for p in d["evidence_pages"])]
    L, H = samples[0]["rows"].shape[:2]
    known = next((v for k, v in KNOWN.items() if k.split(":")[1].startswith(f"{L}x{H}x")), None)
    cal = [d for d in samples if split_of(d["id"], order) == "calibration"]
    held = [d for d in samples if split_of(d["id"], order) == "held"]
    rules: dict[str, object] = {"every row, last 32": lambda d: by_votes(d, "32"),
                                "every row, question": lambda d: by_votes(d, "question")}
    if known:
        rules["needle heads, last 32 (default)"] = lambda d: by_heads(d, list(known), "32")
        rules["needle heads, question"] = lambda d: by_heads(d, list(known), "question")
        rules["needle heads, question+tail"] = lambda d: by_heads(d, list(known), "question+tail")
        rules["needle heads, last 32 - tail"] = lambda d: by_heads(d, list(known), "32-tail")
    for which in ("32", "question"):
        rate = head_hit_rate(cal, which)
        best = rate.flatten().topk(args.heads).indices.tolist()
        chosen = [(i // H, i % H) for i in best]
        label = "last 32" if which == "32" else "question"
        print(f"heads chosen on the calibration half ({label}): "
              + "+".join(f"{a}.{b}" for a, b in chosen) + " hit rates " + " ".join(f"{rate[a, b]:.2f}" for a, b in chosen))
        rules[f"real-question heads, {label}"] = lambda d, c=chosen, w=which: by_heads(d, c, w)
    ks = (1, 2, 4)
    table: dict = {}
    for name, rule in rules.items():
        for part, ds in (("calibration", cal), ("held", held)):
            ranks, hits = [], {k: 0 for k in ks}
            for d in ds:
                rank, h = rank_and_hits(d, rule(d), ks)  # type: ignore[operator]
                ranks.append(rank)
                for k in ks:
                    hits[k] += h[k]
            table.setdefault(name, {})[part] = {"n": len(ds), "first": sum(r == 1 for r in ranks),
                                                "median_rank": float(torch.tensor(ranks, dtype=torch.float).median()),
                                                **{f"read@{k}": hits[k] for k in ks}}
    print(f"\n{len(samples)} samples ({len(cal)} calibration, {len(held)} held); "
          f"evidence page first / read with top-k pages and expand=1 / median rank")
    print("| rule | half | first | read@1 | read@2 | read@4 | median rank |")
    print("|---|---|---|---|---|---|---|")
    for name, parts in table.items():
        for part, c in parts.items():
            print(f"| {name} | {part} | {c['first']}/{c['n']} | {c['read@1']}/{c['n']} | {c['read@2']}/{c['n']} "
                  f"| {c['read@4']}/{c['n']} | {c['median_rank']:g} |")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
