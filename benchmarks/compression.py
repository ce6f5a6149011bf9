"""Accuracy vs keep-ratio of every eviction method on needle retrieval in book text.

A needle ("The secret number of NAME is NNNNN.") sits at a seeded depth of a
real book (../shared/data/books); the question asks for the number. Each
method compresses the context to ``ratio x context tokens`` per layer in both
modes (question-agnostic: the context is compressed before the question is
seen; question-aware: the question drives the scores) and the answer is
greedy-decoded. Multi-needle: three needles with different names, one asked.

``--forms held`` scores the same methods on a split nothing was tuned on: the
needle sentences and person-style questions of ``longctx.py``'s held forms
(locker, extension, grid square, ...), seven-digit numbers of which half
repeat a digit in a row, every book in turn, no answer prefix (the model
answers in its own words). An answer counts only when its first number is the
needle's, digit for digit; a first number of the right length that differs in
one or two digits is counted apart as a lost digit.

Prints a table, writes JSON (every sample) and a PNG (accuracy vs keep-ratio,
one line per method, one panel per mode).

    nice -n 10 python benchmarks/compression.py --model smollm2-135m --length 4096 --samples 6 \
        --out benchmarks/results/compression-smollm2-4k.json
    nice -n 10 python benchmarks/compression.py --forms held --samples 10 \
        --out benchmarks/results/compression-held-smollm2-4k.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import time
from pathlib import Path

import torch
from longctx import FORMS  # the held needle wordings, shared with the retrieval benchmark

from longkv import LLM
from longkv.engine.runner import Runner, Sequence
from longkv.policies import DensePolicy, make_policy
from longkv.policies.modes import prefill_with_question

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT.parent / "shared" / "data" / "books"
METHODS = ["snapkv", "kvzip", "expected_attention", "h2o", "tova", "pyramid", "adakv", "knorm", "streaming", "random"]
QUERY_FREE = {"knorm", "streaming", "random"}  # same kept context in both modes: run question-agnostic only
NAMES = ["Tobias", "Marguerite", "Ezekiel", "Philippa", "Octavia", "Barnaby", "Cornelius", "Imogen"]


def with_facts(llm: LLM, text: str, n_tokens: int, facts: list[str], rng: random.Random) -> str:
    """The first ``n_tokens`` tokens of ``text`` with each fact inserted at a token boundary, depth uniform in [5 %, 95 %]."""
    hay = llm.encode(text)[:n_tokens]
    for f in facts:
        at = int(len(hay) * rng.uniform(0.05, 0.95))
        hay = hay[:at] + llm.encode(f) + hay[at:]
    return llm.tokenizer.decode(hay)


def number_span(llm: LLM, text: str, number: str) -> list[int]:
    """Indices of the tokens of ``llm.encode(text)`` that spell the first ``number`` standing alone in ``text`` (``[]`` if none)."""
    m = re.search(rf"(?<!\d){number}(?!\d)", text)
    if m is None:
        return []
    enc = llm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < m.end() and b > m.start()]


def number_kept(seq: Sequence, span: list[int]) -> float | None:
    """Share of the cache's stores (a layer, or a layer's KV head for per-head methods) that still hold every token of
    ``span`` (positions in the context), or None without a span."""
    if not span:
        return None
    want = torch.tensor(span)
    stores = [h for i in range(len(seq.cache)) for h in getattr(seq.cache[i], "heads", [seq.cache[i]])]
    return sum(bool(torch.isin(want, s.positions().cpu()).all()) for s in stores) / len(stores)


def make_sample(llm: LLM, book: str, length: int, seed: int, needles: int) -> dict:
    """Context/question token ids around ``needles`` needles at seeded depths; the answer is the first needle's number."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, needles)
    numbers = [str(rng.randint(10000, 99999)) for _ in names]
    facts = [f" The secret number of {n} is {x}. " for n, x in zip(names, numbers, strict=True)]
    question = f"What is the secret number of {names[0]}? Answer with the number only."
    budget_tokens = length - 40 - sum(len(llm.encode(f)) for f in facts)
    start = rng.randint(0, len(book) // 2)
    context = with_facts(llm, book[start : start + budget_tokens * 6], budget_tokens, facts, rng)
    # the answer starts right away: the assistant turn opens with the sentence the number completes
    prompt = llm.apply_chat_template([{"role": "user", "content": context + "\n\n" + question}])
    prompt += f"The secret number of {names[0]} is"
    cut = prompt.index("\n\n" + question)
    return {
        "context_ids": llm.encode(prompt[:cut]),
        "question_ids": llm.encode(prompt[cut:]),
        "number_span": number_span(llm, prompt[:cut], numbers[0]),
        "answer": numbers[0],
        "seed": seed,
        # the same sample as text, for other tools (kvpress_compare.py)
        "context": context, "question": question, "answer_prefix": f"The secret number of {names[0]} is",
    }


def held_number(rng: random.Random) -> str:
    """Seven digits; every other one has a digit doubled in place (``3391827``), the shape whose last digits pooling lost."""
    digits = [str(rng.randint(1, 9))] + [str(rng.randint(0, 9)) for _ in range(6)]
    if rng.random() < 0.5:
        at = rng.randint(0, 5)
        digits[at + 1] = digits[at]
    return "".join(digits)


def make_held_sample(llm: LLM, books: list[Path], length: int, seed: int, needles: int, lead: str = "") -> dict:
    """A sample of the held split: held needle forms, book ``seed mod len(books)``, the question as a person asks it,
    the assistant's turn opened with ``lead`` (the same words for every form, e.g. "The answer is", or nothing);
    the answer is the first needle's number."""
    rng = random.Random(1000 + seed)
    forms = rng.sample(FORMS["held"], needles)
    numbers = [held_number(rng) for _ in forms]
    facts = [" " + f.format(n=x) + " " for (f, _), x in zip(forms, numbers, strict=True)]
    question = forms[0][1]
    book = books[seed % len(books)].read_text()
    budget_tokens = length - 60 - sum(len(llm.encode(f)) for f in facts)
    start = rng.randint(len(book) // 20, len(book) // 2)
    context = with_facts(llm, book[start : start + budget_tokens * 6], budget_tokens, facts, rng)
    if lead == "needle":  # the needle's own words up to its number, as the benchmark's form primes its answer
        lead = forms[0][0].split("{n}")[0].rstrip()
    prompt = llm.apply_chat_template([{"role": "user", "content": context + "\n\n" + question}]) + lead
    cut = prompt.index("\n\n" + question)
    return {
        "context_ids": llm.encode(prompt[:cut]), "question_ids": llm.encode(prompt[cut:]), "answer": numbers[0], "seed": seed,
        "number_span": number_span(llm, prompt[:cut], numbers[0]),
        "book": books[seed % len(books)].name, "context": context, "question": question, "answer_prefix": lead, "exact": True,
    }


def first_number(text: str) -> str:
    """The first run of digits in ``text`` (thousands separators dropped), or ``""``."""
    m = re.search(r"\d[\d,]*", text)
    return m.group(0).replace(",", "") if m else ""


def edits(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def score(answer: str, text: str, exact: bool) -> dict:
    """``correct``: the needle's number is the answer's first number (``exact``) or anywhere in it; ``lost_digits``:
    the first number is not the needle's but its first three digits or more (the rest cut off), or one or two digit
    edits away from it (a digit dropped, changed or doubled)."""
    got = first_number(text)
    correct = got == answer if exact else answer in text
    cut = len(got) >= 3 and answer.startswith(got)
    return {"correct": correct, "lost_digits": not correct and bool(got) and (cut or edits(got, answer) <= 2), "number": got, "answer": answer}


def answer(llm: LLM, spec: str, ratio: float, mode: str, sample: dict, max_new: int = 6) -> dict:
    ctx, q = sample["context_ids"], sample["question_ids"]
    budget = max(int(ratio * len(ctx)), 64)
    policy = DensePolicy() if spec == "dense" else make_policy(spec, budget=budget)
    policy = policy.resolve(llm.config, llm.engine_config)
    runner = Runner(llm.model, policy, llm.engine_config)
    seq = runner.new_sequence(len(ctx) + len(q) + max_new)
    t0 = time.perf_counter()
    logits = prefill_with_question(runner, seq, ctx, q, "question-agnostic" if spec == "dense" else mode)  # type: ignore[arg-type]
    kept = number_kept(seq, sample.get("number_span", []))
    out: list[int] = []
    for _ in range(max_new):
        tok = int(logits.argmax())
        if tok in llm.eos_ids:
            break
        out.append(tok)
        logits = runner.decode(seq, tok)
    text = llm.tokenizer.decode(out, skip_special_tokens=True)
    return {
        "method": spec, "ratio": ratio, "mode": mode, "budget": budget, "seed": sample["seed"],
        "context_tokens": len(ctx), "text": text, **score(sample["answer"], text, exact=sample.get("exact", False)),
        "number_kept": kept, "peak_kv_bytes": seq.peak_kv_bytes, "seconds": round(time.perf_counter() - t0, 2),
    }


def summarise(rows: list[dict]) -> dict[tuple[str, str, float], float]:
    acc: dict[tuple[str, str, float], list[bool]] = {}
    for r in rows:
        acc.setdefault((r["method"], r["mode"], r["ratio"]), []).append(r["correct"])
    return {k: 100.0 * sum(v) / len(v) for k, v in acc.items()}


def _order(rows: list[dict]) -> list[str]:
    """Method names, each of ours followed by kvpress's same method (``kvpress:NAME``)."""
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("dense", "kvpress:dense")))
    ours = [m for m in names if not m.startswith("kvpress:")]
    theirs = [m for m in names if m.startswith("kvpress:") and m[8:] not in ours]
    return [x for m in ours for x in (m, f"kvpress:{m}") if x in names] + theirs


def table(rows: list[dict], ratios: list[float]) -> str:
    """Markdown: accuracy (%) per method, mode and keep-ratio; where rows were scored digit by digit, the number of
    answers that lost digits follows in parentheses when there are any."""
    s = summarise(rows)
    n: dict[tuple[str, str], set[int]] = {}
    lost: dict[tuple[str, str, float], int] = {}
    for r in rows:
        n[(r["method"], r["mode"])] = n.get((r["method"], r["mode"]), set()) | {r["seed"]}
        key = (r["method"], r["mode"], r["ratio"])
        lost[key] = lost.get(key, 0) + int(r.get("lost_digits", False))

    def cell(key: tuple[str, str, float]) -> str:
        if key not in s:
            return ""
        return f"{s[key]:.0f}" + (f" ({lost[key]} lost digits)" if lost.get(key) else "")

    cols = [r for r in ratios if r != 1.0] + [1.0]
    lines = ["| method | mode | samples | " + " | ".join(f"{int(r * 100)} % kept" for r in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name, key in (("dense", ("dense", "dense", 1.0)), ("kvpress:dense", ("kvpress:dense", "question-agnostic", 1.0))):
        if key in s:
            lines.append(f"| {name} | - | {len(n[(key[0], key[1])])} | " + " | " * (len(cols) - 1) + cell(key) + " |")
    for m in _order(rows):
        for mode in ("question-agnostic", "question-aware"):
            cells = [cell((m, mode, r)) for r in cols]
            if any(cells):
                lines.append(f"| {m} | {mode} | {len(n[(m, mode)])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def title(meta: dict) -> str:
    """The plot's title: model, context, needles, samples, and the held split's wording when used."""
    forms = ", held wordings" + (f" (answer opened by {meta['lead']!r})" if meta.get("lead") else "") if meta.get("forms") == "held" else ""
    return f"{meta['model']}, {meta['length']}-token book context{forms}, {meta['needles']} needle(s), {meta['samples']} samples"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(rows)
    dense = s.get(("dense", "dense", 1.0))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), sharey=True)
    colors: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["#444444", "#aa7700", "#007777"]
    for ax, mode in zip(axes, ("question-agnostic", "question-aware"), strict=True):
        for m in _order(rows):
            pts = sorted((r, a) for (mm, md, r), a in s.items() if mm == m and md == mode)
            if not pts:
                continue
            base = m.removeprefix("kvpress:")
            color = colors.setdefault(base, palette[len(colors) % len(palette)])
            theirs = m.startswith("kvpress:")
            if dense is not None and not theirs:
                pts.append((1.0, dense))
            ax.plot([100 * r for r, _ in pts], [a for _, a in pts], marker="s" if theirs else "o", linestyle="--" if theirs else "-",
                    color=color, label=m, alpha=0.8 if theirs else 1.0)
        if dense is not None:
            ax.axhline(dense, color="black", lw=0.8, ls=":", label="dense (longkv)")
        ax.set_title(mode)
        ax.set_xlabel("KV kept (% of context tokens)")
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("needle accuracy (%)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    theirs_too = any(r["method"].startswith("kvpress:") for r in rows)
    fig.suptitle(title + (" (dashed: NVIDIA kvpress, same samples)" if theirs_too else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


RSS_CHILD = """
import resource, sys
from longkv import LLM
path, book, n, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llm = LLM(model=path, dtype="bfloat16", chunk_size=512)
text = open(book).read()
base = llm.encode(text)
ids = (base * (n // len(base) + 1))[:n]
g = llm.generate(ids, max_new_tokens=4, policy=spec)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, g.stats.peak_kv_bytes, g.stats.prefill_s)
"""


def measure_rss(model_path: str, book: Path, lengths: list[int], spec: str) -> list[dict]:
    """Peak process RSS (bytes) of one generation per input length, each in a fresh process."""
    import sys

    out = []
    for n in lengths:
        res = subprocess.run([sys.executable, "-c", RSS_CHILD, model_path, str(book), str(n), spec], capture_output=True, text=True, check=True)
        rss, kv, prefill_s = res.stdout.split()
        out.append({"tokens": n, "policy": spec, "peak_rss_bytes": int(rss), "peak_kv_bytes": int(kv), "prefill_s": float(prefill_s)})
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096, help="context tokens")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=0, help="samples use seeds first-seed .. first-seed + samples - 1")
    ap.add_argument("--needles", type=int, default=1)
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="question-agnostic,question-aware")
    ap.add_argument("--book", default="dracula.txt", help="the book of the benchmark's needle form (held: every book in turn)")
    ap.add_argument("--forms", choices=["benchmark", "held"], default="benchmark",
                    help="benchmark: 'The secret number of NAME is N.' with the answer prefixed; held: the wordings nothing was tuned on")
    ap.add_argument("--lead", default="", help="held forms: words that open the assistant's answer: the same for every form (e.g. 'The answer is'), "
                    "or 'needle' for the needle's own words up to its number")
    ap.add_argument("--all-modes", action="store_true", help="also run query-free methods question-aware")
    ap.add_argument("--configs", default="", help="method@mode pairs instead of methods x modes, comma-separated (e.g. snapkv:kernel=1,chunk=8@question-aware,kvzip@question-agnostic)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference runs")
    ap.add_argument("--report", default="", help="instead: merge these result JSONs (comma-separated) into --out, table + plot")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compression.json")
    ap.add_argument("--rss", default="", help="instead: peak RSS per input length, e.g. 4096,16384 (policy --rss-policy)")
    ap.add_argument("--rss-policy", default="snapkv:budget=2048")
    ap.add_argument("--dump-samples", type=Path, default=None, help="instead: write the samples as text (for kvpress_compare.py) and exit")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.report:
        parts = [json.loads(Path(f).read_text()) for f in args.report.split(",")]
        rows = [r for part in parts for r in part["rows"]]
        meta = parts[0]["meta"]
        seeds = {r["seed"] for r in rows}
        meta["samples"] = len(seeds)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(table(rows, [*ratios, 1.0]))
        plot(rows, args.out.with_suffix(".png"), title(meta))
        return
    torch.manual_seed(0)
    path = subprocess.run([str(ROOT.parent / "shared" / "models" / "get-model"), args.model], capture_output=True, text=True, check=True).stdout.strip()
    if args.rss:
        rows = measure_rss(path, BOOKS / args.book, [int(n) for n in args.rss.split(",")], args.rss_policy)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        base = rows[0]["peak_rss_bytes"]
        for r in rows:
            print(f"{r['tokens']:>7} tokens: peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB ({100 * (r['peak_rss_bytes'] / base - 1):+.1f} %), peak KV {r['peak_kv_bytes'] / 2**20:.1f} MiB")
        return
    llm = LLM(model=path, dtype="bfloat16", chunk_size=512)
    book = (BOOKS / args.book).read_text()
    seeds = range(args.first_seed, args.first_seed + args.samples)
    if args.forms == "held":
        books = sorted(p for p in BOOKS.glob("*.txt"))
        samples = [make_held_sample(llm, books, args.length, seed, args.needles, args.lead) for seed in seeds]
    else:
        samples = [make_sample(llm, book, args.length, seed, args.needles) for seed in seeds]
    max_new = 24 if args.forms == "held" else 6
    if args.dump_samples:
        keep = ("seed", "answer", "context", "question", "answer_prefix")
        dump = {"meta": {"model": args.model, "model_path": path, "length": args.length, "needles": args.needles, "book": args.book, "samples": args.samples},
                "samples": [{k: s[k] for k in keep} for s in samples]}
        args.dump_samples.write_text(json.dumps(dump, indent=1))
        print(f"wrote {len(samples)} samples to {args.dump_samples}")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    meta = {"model": args.model, "length": args.length, "needles": args.needles, "book": args.book, "samples": args.samples,
            "forms": args.forms, "lead": args.lead}

    def save() -> None:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for sample in [] if args.no_dense else samples:  # dense once per sample
        r = answer(llm, "dense", 1.0, "dense", sample, max_new)
        rows.append(r)
        print(f"dense seed={r['seed']} answer={sample['answer']} correct={r['correct']} {r['text']!r} ({r['seconds']} s)", flush=True)
    save()
    if args.configs:  # explicit method@mode pairs, e.g. snapkv@question-aware
        # a spec may hold commas itself (snapkv:kernel=1,chunk=8@question-aware): split after each mode
        pairs = [tuple(c.rsplit("@", 1)) for c in re.split(r"(?<=question-aware),|(?<=question-agnostic),", args.configs)]
    else:
        pairs = [
            (m, mode) for m in args.methods.split(",") for mode in args.modes.split(",")
            if not (m in QUERY_FREE and mode == "question-aware" and not args.all_modes)
        ]
    for method, mode in pairs:
        for ratio in ratios:
            for sample in samples:
                rows.append(answer(llm, method, ratio, mode, sample, max_new))
            acc = summarise(rows)[(method, mode, ratio)]
            cell = [r for r in rows if (r["method"], r["mode"], r["ratio"]) == (method, mode, ratio)]
            lost = sum(r["lost_digits"] for r in cell)
            whole = [r["number_kept"] for r in cell if r["number_kept"] is not None]
            held = f"  number whole in {100 * sum(whole) / len(whole):.0f} % of stores" if whole else ""
            print(f"{method:20s} {mode:18s} {ratio:5.2f}: {acc:5.1f} %  lost digits {lost}/{len(cell)}{held}  "
                  f"{[(r['text'][:30], r['number_kept']) for r in cell if not r['correct']]}", flush=True)
            save()
    print(table(rows, [*ratios, 1.0]))
    plot(rows, args.out.with_suffix(".png"), title(meta))


if __name__ == "__main__":
    main()
