"""Real questions over real files: code (this repository, the Python standard library) and books.

Each question of ``questions.json`` has its answer in one place of one file
(``evidence``, an exact substring of it): a constant in a module, a detail of a
chapter. A sample puts that file among others of the same kind (other modules
of the same tree, or the book's own text around the passage) in a prompt of
``--lengths`` tokens, the answer's file at a seeded depth, framed as
``longkv ask`` frames files (``### File: NAME`` sections, the question last, the
model's chat template). An answer is right when it holds one of the question's
key phrases (case-insensitive; a phrase that is a number must appear as a whole
number, so ``32`` does not count in ``320``).

Per sample the context is prefilled once with block_topk's sinks + window, and
every block_topk variant answers from a twin of that cache (the default: what
``ask`` uses past 3 072 tokens, then more pages per question). Page recall: a
page holding the evidence is among those the question chose. ``--dense`` adds
a dense answer on the whole prompt (inside the trained window only) and
``--evict SPEC`` an eviction method at a fixed budget, question-aware.

    nice -n 10 python benchmarks/questions.py --model qwen2.5-coder-0.5b --lengths 8192 --dense \\
        --evict snapkv:budget=2048 --out benchmarks/results/questions-qwen05-8k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import subprocess
import sysconfig
import time
from pathlib import Path

import torch
from longctx import branch, capture_rows, greedy, recall  # one prefill, several block_topk answers from twins of it

from longkv import LLM
from longkv.engine.runner import Runner, Sequence
from longkv.inputs import Document
from longkv.policies import BlockTopKPolicy, make_policy

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT.parent / "shared" / "data" / "books"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
QUESTIONS = Path(__file__).with_name("questions.json")


def source_root(kind: str) -> Path:
    """Where the files of a question's ``source`` live: ``repo`` (this repository), ``stdlib``, ``book``."""
    return {"repo": ROOT, "stdlib": STDLIB, "book": BOOKS}[kind]


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return json.loads(path.read_text())


def matches(answer: str, phrases: list[str]) -> bool:
    """Whether ``answer`` holds one of ``phrases``: case-insensitive; a phrase made of digits (and one
    decimal point) counts only as a whole number, not inside a longer one."""
    low = answer.lower()
    for p in phrases:
        if re.fullmatch(r"\d[\d,]*(\.\d+)?", p):
            if re.search(rf"(?<![\d.,]){re.escape(p)}(?!\.?\d)", answer):
                return True
        elif p.lower() in low:
            return True
    return False


def fillers(kind: str, exclude: str) -> list[tuple[str, str]]:
    """(name, text) of the other files a code question's answer file is put among: the repository's
    ``longkv`` package or the standard library's top-level modules, sorted by name."""
    root = source_root(kind)
    files = sorted(root.glob("longkv/**/*.py")) if kind == "repo" else sorted(root.glob("*.py"))
    out = []
    for f in files:
        name = str(f.relative_to(root))
        if name != exclude and "__pycache__" not in name:
            out.append((name, f.read_text(errors="replace")))
    return out


def window(text: str, evidence: str, n_chars: int, depth: float) -> tuple[int, int]:
    """Bounds ``[lo, hi)`` of at most ``n_chars`` characters of ``text`` holding ``evidence`` at about ``depth``
    of the window, cut at line breaks, shifted to stay inside ``text``."""
    at = text.index(evidence)
    lo = max(0, min(at - int(depth * n_chars), len(text) - n_chars))
    hi = min(len(text), lo + n_chars)
    if lo > 0:
        lo = text.find("\n", lo) + 1 or lo
    if hi < len(text):
        hi = max(text.rfind("\n", lo, hi), at + len(evidence))
    return lo, hi


def make_docs(q: dict, n_chars: int, depth: float, rng: random.Random) -> list[Document]:
    """The documents of one sample, about ``n_chars`` characters in all, the evidence at about ``depth`` of them.

    A book: one stretch of the book around the evidence. Code: the answer's file (the lines around the
    evidence when the file alone is longer than half the budget) among other files of the same tree in
    a seeded order, cut at a line where they fill the room before or after it (the evidence lands at
    ``depth`` as far as the answer's file allows).
    """
    root = source_root(q["source"])
    text = (root / q["file"]).read_text(errors="replace")
    if q["source"] == "book":
        lo, hi = window(text, q["evidence"], n_chars, depth)
        return [Document(q["file"].removesuffix(".txt").replace("-", " ").title(), text[lo:hi])]
    name = q["file"]
    if len(text) > n_chars // 2:
        lo, hi = window(text, q["evidence"], n_chars // 2, depth)
        first = text.count("\n", 0, lo) + 1
        name = f"{name} (lines {first}-{first + text.count(chr(10), lo, hi)})"
        text = text[lo:hi]
    others = fillers(q["source"], q["file"])
    rng.shuffle(others)
    room = n_chars - len(text)
    pos = 0

    def take(n: int) -> list[Document]:
        """The next files of ``others`` up to ``n`` characters, the last one cut at a line."""
        nonlocal pos
        docs: list[Document] = []
        while pos < len(others) and n > 0:
            fname, ftext = others[pos]
            part = ftext if len(ftext) <= n else ftext[: ftext.rfind("\n", 0, n) + 1]
            if len(part) < len(ftext) and not part.strip():
                break  # not one whole line of the next file fits: leave it for the next call
            pos += 1
            if part.strip():
                docs.append(Document(fname, part))
                n -= len(part)
        return docs

    docs_before = take(min(room, max(0, int(depth * n_chars) - text.index(q["evidence"]))))
    docs_after = take(room - sum(len(d.text) for d in docs_before))
    return [*docs_before, Document(name, text), *docs_after]


def make_sample(llm: LLM, q: dict, n_tokens: int, seed: int) -> dict:
    """Prompt ids of about ``n_tokens`` (at most) for question ``q``, the evidence's token range and depth."""
    rng = random.Random(f"{q['id']}/{n_tokens}/{seed}")
    depth = rng.uniform(0.1, 0.9)
    n_chars = n_tokens * 3

    def render(chars: int) -> tuple[str, list[int], list[int] | None]:
        docs = make_docs(q, chars, depth, random.Random(f"{q['id']}/{n_tokens}/{seed}/docs"))
        return (llm.ask_text(docs, q["question"]), *llm.ask_ids(docs, q["question"]))

    text, ids, qids = render(n_chars)
    for _ in range(6):  # characters per token differ between code and prose: scale to the length asked
        if n_tokens * 0.97 <= len(ids) <= n_tokens:
            break
        n_chars = int(n_chars * (n_tokens * 0.985) / len(ids))
        text, ids, qids = render(n_chars)
    while len(ids) > n_tokens:
        n_chars = int(n_chars * 0.98)
        text, ids, qids = render(n_chars)
    at = text.index(q["evidence"])
    lo = len(llm.prompt_ids(text[:at]))
    hi = len(llm.prompt_ids(text[: at + len(q["evidence"])]))
    return {"ids": ids, "tokens": len(ids), "evidence_tokens": (lo, hi), "depth": round(lo / len(ids), 3), "question_ids": qids}


def prefill_context(llm: LLM, pol: BlockTopKPolicy, ids: list[int], room: int) -> tuple[Sequence, int]:
    """A sequence holding the context (``ids`` up to ``pol``'s question start) prefilled with sinks + window
    and no selection, with ``room`` more tokens to come after the question; and the question start."""
    split = pol.question_start(len(ids))
    runner = Runner(llm.model, dataclasses.replace(pol, topk=0), llm.engine_config)
    seq = runner.new_sequence(len(ids) + room + 16)
    runner.prefill(seq, ids[:split])
    return seq, split


LAST_ROWS = "block_topk default, last 32 queries"  # the variant that chooses pages without knowing the question


def answer_block_topk(llm: LLM, sample: dict, variants: dict[str, BlockTopKPolicy], max_new: int) -> dict:
    """Every variant's answer from twins of one sinks + window prefill of the context; page recall of each.

    Pages are chosen from the queries of the question's own tokens, as ``ask`` chooses them (the
    ``LAST_ROWS`` variant: from the last ``query_tokens`` queries, heading and text before the question too)."""
    ids, ps = sample["ids"], llm.engine_config.page_size
    t0 = time.perf_counter()
    seq, split = prefill_context(llm, next(iter(variants.values())), ids, max_new)
    out = {"prefill_s": round(time.perf_counter() - t0, 2)}
    lo, hi = sample["evidence_tokens"]
    pages = set(range(lo // ps, (hi - 1) // ps + 1))
    for name, pol in variants.items():
        work, restore = branch(llm, seq)
        r = Runner(llm.model, pol, llm.engine_config)
        assert work.selection is not None
        work.selection.question_tokens = 0 if name == LAST_ROWS else len(sample["question_ids"])
        t1 = time.perf_counter()
        logits = r.ask(work, ids[split:])
        text = greedy(llm, r, work, logits, max_new)
        out[name] = {"text": text, "answer_s": round(time.perf_counter() - t1, 2)}
        if pol.k(llm.config):
            out[name] |= recall(pol, work, pages)
        restore()
    return out


def dump_rows(llm: LLM, q: dict, sample: dict, path: Path, query_tokens: int = 64) -> None:
    """Save every (layer, query head, query) row's page ratings at the question (float16, ``(L, Hq, T, C)``),
    with the candidate pages, the evidence's pages and where the question's own tokens sit among the ``T``
    queries, so that page-selection rules can be compared offline on real questions."""
    pol = BlockTopKPolicy(topk=1, heads="all", query_tokens=query_tokens).resolve(llm.config, llm.engine_config)
    pol, rows = capture_rows(pol)
    ids, ps = sample["ids"], llm.engine_config.page_size
    seq, split = prefill_context(llm, pol, ids, 0)
    Runner(llm.model, pol, llm.engine_config).ask(seq, ids[split:])
    assert seq.selection is not None
    lo, hi = sample["evidence_tokens"]
    t = len(ids) - split
    start = max(t - len(sample["question_ids"]), 0)  # the question, then the template's tail
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": torch.stack(rows).reshape(len(rows), llm.config.n_heads, t, -1),
                "candidates": seq.selection.candidates, "evidence_pages": list(range(lo // ps, (hi - 1) // ps + 1)),
                "question": (start, min(start + len(llm.encode(q["question"])), t)), "id": q["id"], "source": q["source"],
                "tokens": len(ids), "depth": sample["depth"]}, path)


def answer_generate(llm: LLM, sample: dict, spec: str, question_aware: bool, max_new: int) -> dict:
    """One answer through :meth:`LLM.generate` under ``spec`` (dense, or an eviction method with the question's
    tokens: the question and the template's tail, as :meth:`LLM.ask_ids` gives them)."""
    ids = sample["ids"]
    qids = sample["question_ids"] if question_aware else None
    t0 = time.perf_counter()
    g = llm.generate(ids, max_new_tokens=max_new, policy=spec, question_ids=qids)
    return {"text": g.text, "answer_s": round(time.perf_counter() - t0, 2), "prefill_s": round(g.stats.prefill_s, 2),
            "kv_peak_mib": round(g.stats.peak_kv_bytes / 2**20, 1)}


def summarise(rows: list[dict]) -> dict:
    """Per (length, source, arm): answered right, samples, page recall (block_topk arms)."""
    table: dict = {}
    for r in rows:
        for arm, a in r["answers"].items():
            for src in (r["source"], "all"):
                cell = table.setdefault(str(r["length"]), {}).setdefault(src, {}).setdefault(arm, {"right": 0, "n": 0, "recall": 0, "has_recall": 0})
                cell["right"] += int(a["correct"])
                cell["n"] += 1
                if "recall" in a:
                    cell["recall"] += int(a["recall"])
                    cell["has_recall"] += 1
    return table


def print_table(table: dict) -> None:
    for length, by_src in table.items():
        arms = list(by_src["all"])
        print(f"\n{length} tokens: right / samples (page recall)")
        print("| source | " + " | ".join(arms) + " |")
        print("|---" * (len(arms) + 1) + "|")
        for src, cells in sorted(by_src.items(), key=lambda kv: kv[0] == "all"):
            row = []
            for arm in arms:
                c = cells.get(arm)
                if c is None:
                    row.append("-")
                    continue
                rec = f" ({c['recall']}/{c['has_recall']})" if c["has_recall"] else ""
                row.append(f"{c['right']}/{c['n']}{rec}")
            print(f"| {src} | " + " | ".join(row) + " |")


def resolve_model(name: str) -> str:
    if Path(name).exists():
        return name
    return subprocess.run([str(ROOT.parent / "shared" / "models" / "get-model"), name], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a GGUF path or a name for ../shared/models/get-model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--only", nargs="*", default=[], help="question ids or sources (repo, stdlib, book) to run")
    ap.add_argument("--topk", type=int, nargs="*", default=[2, 4], help="block_topk variants beside the default")
    ap.add_argument("--extra", nargs="*", default=[], metavar="LABEL::KNOBS",
                    help='more block_topk variants, e.g. "every row::topk=2,heads=all"')
    ap.add_argument("--last-rows", action="store_true", help="also the default choosing pages from the last 32 "
                    "queries (heading and text before the question too), as before questions named themselves")
    ap.add_argument("--dense", action="store_true", help="also answer densely (prompts inside the trained window only)")
    ap.add_argument("--evict", nargs="*", default=[], help="eviction methods answered question-aware, e.g. snapkv:budget=2048")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", default=str(QUESTIONS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "questions.json"))
    ap.add_argument("--dump-rows", metavar="DIR", help="no answers: save every row's page ratings per sample "
                    "(float16 .pt files) for offline study of page selection (benchmarks/selection.py)")
    args = ap.parse_args()

    qs = [q for q in load_questions(Path(args.questions)) if not args.only or q["id"] in args.only or q["source"] in args.only]
    llm = LLM(model=resolve_model(args.model), dtype="bfloat16")
    default = BlockTopKPolicy().resolve(llm.config, llm.engine_config)
    variants: dict[str, BlockTopKPolicy] = {f"block_topk default (k={default.k(llm.config)})": default}
    variants |= {f"block_topk k={k}": dataclasses.replace(default, topk=k) for k in args.topk if k != default.k(llm.config)}
    if args.last_rows:
        variants[LAST_ROWS] = default
    for extra in args.extra:
        label, _, knobs = extra.partition("::")
        pol = make_policy("block_topk" + (f":{knobs}" if knobs else ""))
        assert isinstance(pol, BlockTopKPolicy)
        variants[label] = pol.resolve(llm.config, llm.engine_config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for n in args.lengths:
        for q in qs:
            sample = make_sample(llm, q, n, args.seed)
            if args.dump_rows:
                path = Path(args.dump_rows) / f"{n}-{args.seed}-{q['id']}.pt"
                if not path.exists():
                    t0 = time.perf_counter()
                    dump_rows(llm, q, sample, path)
                    print(f"{n} {q['id']} depth={sample['depth']} {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
                continue
            res = answer_block_topk(llm, sample, variants, args.max_new)
            answers = {k: v for k, v in res.items() if isinstance(v, dict)}
            if args.dense and sample["tokens"] + args.max_new <= llm.config.max_position:
                answers["dense"] = answer_generate(llm, sample, "dense", False, args.max_new)
            for spec in args.evict:
                answers[spec] = answer_generate(llm, sample, spec, True, args.max_new)
            for a in answers.values():
                a["correct"] = matches(a["text"], q["answers"])
            rows.append({"id": q["id"], "source": q["source"], "length": n, "tokens": sample["tokens"], "depth": sample["depth"],
                         "prefill_s": res["prefill_s"], "answers": answers})
            brief = {k: int(v["correct"]) for k, v in answers.items()}
            print(f"{n} {q['id']} depth={sample['depth']} {brief}", flush=True)
            out.write_text(json.dumps({"args": vars(args), "samples": rows, "summary": summarise(rows)}, indent=1))
    print_table(summarise(rows))


if __name__ == "__main__":
    main()
