"""Single-needle retrieval far beyond the trained window: answer accuracy and page recall.

A sentence "The secret number is NNNNNN." is put into real book text
(../shared/data/books) at depths spread from 0 to 100 %, followed by the
question. For every sample the context is prefilled **once** (sinks + local
window, linear cost) and then several answers are read from the same cache:

* ``block_topk`` variants (k pages, score), each choosing its pages from the
  question and keeping them for the answer;
* ``local``: the same sinks + window with no retrieved page (what a
  StreamingLLM cache of that size answers);
* optionally ``dense`` on the full prompt (only where it fits the trained window).

Page recall: the needle's page is among the selected ones. Also reported: the
needle page's rank among the candidates, and the share of (layer, KV head)
pairs whose own top-k holds it.

    nice -n 10 python benchmarks/longctx.py --lengths 16384 32768 --samples 6 --out benchmarks/results/longctx.json

Prints a table and writes JSON (samples and the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from longkv import LLM
from longkv.engine.runner import Runner, Sequence
from longkv.kv.cache import KVCache
from longkv.policies import BlockTopKPolicy, make_policy

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT.parent / "shared" / "data" / "books"
MODEL = Path.home() / ".cache" / "longkv-test-models" / "smollm2-135m.gguf"
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."


_BOOK_IDS: dict[str, list[int]] = {}


def frame(llm: LLM, content: str, question: str | None = None, lead: str = "") -> str:
    """The prompt text of ``content`` followed by ``question``: in the model's chat template, or, for a base
    model (no template, e.g. Gemma 3 270M), as a completion that ends with ``lead`` for the model to go on
    from ("The secret number is")."""
    if getattr(llm.tokenizer, "chat_template", None):
        return llm.apply_chat_template([{"role": "user", "content": content + (f"\n\n{question}" if question else "")}])
    if question is None:
        return content
    return f"{content}\n\nQuestion: {question.replace(' Answer with the number only.', '')}\nAnswer: {lead}".rstrip()


def haystack(llm: LLM, books: list[Path], first: int, n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of book text: a random stretch of ``books[first]``, continued by the next books
    (cycling, tokenized once per run) when one book is too short (128 K tokens and beyond)."""
    ids: list[int] = []
    i = first
    while len(ids) < n + 1000:
        book = books[i % len(books)]
        if book.name not in _BOOK_IDS:
            _BOOK_IDS[book.name] = llm.encode(book.read_text())
        ids += _BOOK_IDS[book.name] + llm.encode("\n\n")
        i += 1
    start = rng.randint(0, len(ids) - n - 1)
    return ids[start : start + n]


def make_sample(llm: LLM, hay_ids: list[int], n_tokens: int, depth: float, rng: random.Random) -> dict:
    """A prompt (chat template, or a completion for a base model) of about ``n_tokens`` with the needle at ``depth`` of ``hay_ids``; token range of the needle."""
    number = str(rng.randint(100000, 999999))
    needle = f" The secret number is {number}. "
    lead = "The secret number is"
    overhead = len(llm.prompt_ids(frame(llm, needle, QUESTION, lead)))
    hay_ids = hay_ids[: n_tokens - overhead]
    hay = len(hay_ids)
    cut = int(depth * hay)
    before = llm.tokenizer.decode(hay_ids[:cut])
    after = llm.tokenizer.decode(hay_ids[cut:])
    prompt = frame(llm, before + needle + after, QUESTION, lead)
    ids = llm.prompt_ids(prompt)
    head = prompt[: prompt.index(needle)]
    lo = len(llm.prompt_ids(head))
    hi = len(llm.prompt_ids(head + needle))
    return {"ids": ids, "number": number, "depth": depth, "needle_tokens": (lo, hi), "tokens": len(ids)}


# Needles of different wording for --needles: one prefill, one question per needle. ``calibration``: the
# forms the retrieval heads were chosen on (benchmarks/retrieval_heads.py); ``held``: forms never used to
# choose anything, asked as a person would (no "mentioned in the text above", the answer's form asked in other words),
# so a score on them says whether the selection generalises beyond the wording it was tuned on.
FORMS = {
    "calibration": [
        ("The secret number is {n}.", "What is the secret number mentioned in the text above? Answer with the number only."),
        ("The code to open the vault is {n}.", "What is the code to open the vault mentioned in the text above? Answer with the number only."),
        ("The lighthouse keeper's badge number is {n}.",
         "What is the lighthouse keeper's badge number mentioned in the text above? Answer with the number only."),
        ("The winning lottery ticket was number {n}.",
         "What was the number of the winning lottery ticket mentioned in the text above? Answer with the number only."),
        ("The train to the coast leaves from platform {n}.",
         "From which platform does the train to the coast leave, according to the text above? Answer with the number only."),
    ],
    "held": [
        ("Mrs. Hale keeps the spare key to the chapel in locker {n}.", "Which locker holds the spare key to the chapel? Just the number, please."),
        ("Dr. Okafor can be reached on extension {n} after six.", "What extension is Dr. Okafor on in the evening? Reply with the number alone."),
        ("Our warehouse in Tilbury holds exactly {n} crates of tea.", "How many crates of tea are in the Tilbury warehouse? Give only the number."),
        ("Note for later: the harbour radio password is {n}.", "I forgot the harbour radio password. What was it? Only the digits, please."),
        ("Captain Reyes logged her last position as grid square {n}.", "Which grid square did Captain Reyes log as her last position? Number only."),
        ("The library's rarest atlas sits under shelf mark {n}.", "Under which shelf mark can I find the library's rarest atlas? Just the number."),
        ("In 1851 the census counted {n} sheep in the valley.", "How many sheep were in the valley in the 1851 census? Answer with a number."),
        ("A seat at the midnight opera costs {n} lira.", "How many lira is a seat at the midnight opera? Just the number."),
        ("Please wire the deposit to account {n} before Friday.", "Which account number should the deposit go to? Only the number."),
        ("The bell foundry's order book lists job {n} as unpaid.", "Which job number is unpaid in the bell foundry's order book? Number only, please."),
    ],
}
NEEDLES = FORMS["calibration"]


def make_multi(llm: LLM, hay_ids: list[int], n_tokens: int, depths: list[float], rng: random.Random,
               forms: list[tuple[str, str]] = NEEDLES) -> dict:
    """One context with a needle of a different wording (``forms``, in turn) at each depth, and one question per needle.

    Returns the shared prompt prefix (context, prefilled once) and, per needle, the
    question's remaining ids, its answer and the needle's token range.
    """
    numbers = [str(rng.randint(100000, 999999)) for _ in depths]
    needles = [" " + forms[i % len(forms)][0].format(n=num) + " " for i, num in enumerate(numbers)]
    questions = [forms[i % len(forms)][1] for i in range(len(depths))]
    overhead = sum(len(llm.encode(x)) for x in needles) + 64
    hay_ids = hay_ids[: n_tokens - overhead]
    cuts = [int(d * len(hay_ids)) for d in depths]
    pieces, prev = [], 0
    for cut, needle in sorted(zip(cuts, needles, strict=True)):
        pieces += [llm.tokenizer.decode(hay_ids[prev:cut]), needle]
        prev = cut
    text = "".join(pieces) + llm.tokenizer.decode(hay_ids[prev:])
    prompts = [llm.prompt_ids(frame(llm, text, q)) for q in questions]
    common = 0
    while all(len(p) > common and p[common] == prompts[0][common] for p in prompts):
        common += 1
    head = frame(llm, text)
    ranges = []
    for needle in needles:
        before = head[: head.index(needle)]
        ranges.append((len(llm.prompt_ids(before)), len(llm.prompt_ids(before + needle))))
    return {"context": prompts[0][:common], "tails": [p[common:] for p in prompts], "numbers": numbers,
            "depths": depths, "needle_tokens": ranges, "tokens": len(prompts[0])}


def run_multi(llm: LLM, sample: dict, base: BlockTopKPolicy, variants: dict[str, BlockTopKPolicy],
              dump: Path | None = None) -> list[dict]:
    """Prefill the shared context once (sinks + window), then ask every needle's question under every variant."""
    ctx, ps = sample["context"], llm.engine_config.page_size
    runner = Runner(llm.model, dataclasses.replace(base, topk=0), llm.engine_config)
    seq = runner.new_sequence(len(ctx) + 64)
    t0 = time.perf_counter()
    marks = iter(range(1, 11))
    mark = next(marks)

    def progress(done: int, total: int) -> None:
        nonlocal mark
        while mark <= 10 and done * 10 >= mark * total:
            print(f"  prefill {mark * 10}% ({done} tokens, {time.perf_counter() - t0:.0f} s)", flush=True)
            mark = next(marks, 11)

    runner.prefill(seq, ctx, progress)
    prefill_s = time.perf_counter() - t0
    kv_ram = round(seq.peak_kv_bytes / 2**20, 1)
    kv_disk = round(sum(getattr(lkv, "disk_bytes", lambda: 0)() for lkv in seq.cache.layers) / 2**20, 1)
    out = []
    for tail, number, depth, (lo, hi) in zip(sample["tails"], sample["numbers"], sample["depths"], sample["needle_tokens"], strict=True):
        res = {"tokens": len(ctx) + len(tail), "depth": depth, "number": number, "prefill_s": round(prefill_s, 2),
               "shared_prefill": len(sample["tails"]), "kv_ram_peak_mib": kv_ram, "kv_disk_mib": kv_disk, "answers": {}}
        for j, (name, pol) in enumerate(variants.items()):
            work, restore = branch(llm, seq)
            rows: list[torch.Tensor] = []
            if dump is not None and j == 0:
                pol, rows = capture_rows(pol)
            r = Runner(llm.model, pol, llm.engine_config)
            t1 = time.perf_counter()
            text = greedy(llm, r, work, r.ask(work, tail), 32)
            needle_pages = set(range(lo // ps, (hi - 1) // ps + 1))
            if rows and dump is not None:
                dump_rows(dump / f"{len(ctx)}-{number}.pt", rows, work, needle_pages, number)
            entry = {"text": text, "correct": number in text, "loops": loops(text), "answer_s": round(time.perf_counter() - t1, 2)}
            if pol.k():
                entry |= recall(pol, work, needle_pages)
            res["answers"][name] = entry
            restore()
        res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out.append(res)
        print(f"  depth={depth:.2f} {number} " + " ".join(f"{k}: {v['text'][:40]!r}" for k, v in res["answers"].items()), flush=True)
    return out


def capture_rows(pol: BlockTopKPolicy) -> tuple[BlockTopKPolicy, list[torch.Tensor]]:
    """A copy of ``pol`` that also keeps, in the returned list, the first-stage page ratings of
    every (layer, KV head, query) row at the question ((R, C) per layer, float16), so
    selection rules can be compared offline on the same caches (``--dump-rows``)."""
    rows: list[torch.Tensor] = []
    pol = dataclasses.replace(pol)
    scores = pol._scores

    def keep(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        cand, z = scores(*args)  # type: ignore[arg-type]
        rows.append(z.flatten(0, 1).half())
        return cand, z

    pol._scores = keep  # type: ignore[method-assign]
    return pol, rows


def dump_rows(path: Path, rows: list[torch.Tensor], seq: Sequence, needle_pages: set[int], number: str) -> None:
    st = seq.selection
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": torch.cat(rows), "candidates": st.candidates, "needle_pages": sorted(needle_pages),
                "number": number}, path)


def greedy(llm: LLM, runner: Runner, seq: Sequence, logits: torch.Tensor, n: int = 20) -> str:
    out: list[int] = []
    for _ in range(n):
        tok = int(logits.argmax())
        if tok in llm.eos_ids:
            break
        out.append(tok)
        logits = runner.decode(seq, tok)
    return llm.tokenizer.decode(out, skip_special_tokens=True)


def loops(text: str, n: int = 3) -> bool:
    """Whether some run of ``n`` words comes back more than twice in ``text`` (a repetition loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) > 2 for g in set(grams))


def branch(llm: LLM, seq: Sequence) -> tuple[Sequence, Callable[[], None]]:
    """A twin of ``seq`` to answer on, and the call that puts ``seq`` back as it was after the answer.

    Sliding layers (Gemma 3) are forked copy-on-write: their ring drops tokens as the answer goes on, so they
    cannot be cut back. Global layers (their pages possibly in the disk tier) are shared and cut back to the
    context's length afterwards.
    """
    n = len(seq.tokens)
    sliding = [spec.window is not None for spec in llm.config.layers]
    twin = object.__new__(KVCache)
    twin.layers = [lkv.fork() if s else lkv for lkv, s in zip(seq.cache.layers, sliding, strict=True)]
    work = dataclasses.replace(seq, cache=twin, tokens=list(seq.tokens), queries=dict(seq.queries))

    def restore() -> None:
        for lkv, s in zip(twin.layers, sliding, strict=True):
            if s:
                lkv.clear()
            else:
                lkv.truncate(n)

    return work, restore


def recall(pol: BlockTopKPolicy, seq: Sequence, needle_pages: set[int]) -> dict:
    st = seq.selection
    chosen = set(st.pages[0].flatten().tolist()) if st.pages[0] is not None else set()
    out = {"recall": bool(chosen & needle_pages)}
    if (st.z is not None or st.score is not None) and len(st.candidates):
        cand = st.candidates.tolist()
        idx = [cand.index(p) for p in needle_pages if p in cand]
        if idx:
            combined = st.score if st.score is not None else st.z.amax(dim=(0, 1))
            out["rank"] = int((combined > combined[idx].max()).sum()) + 1  # by the selection's score; 1 = best
            if st.z is not None:  # per-head votes (not kept when the retrieval heads choose)
                per_head = st.z.topk(min(pol.k(), len(cand)), dim=-1).indices  # (L, Hkv, k)
                hit = torch.zeros(per_head.shape[:2], dtype=torch.bool)
                for i in idx:
                    hit |= (per_head == i).any(-1)
                out["head_recall"] = round(hit.float().mean().item(), 3)
        if st.first_score is not None and pol.verify:
            first = st.first_score
            out["rank_first_stage"] = int((first > first[idx].max()).sum()) + 1 if idx else None
            out["confidence"] = [round(c, 3) for c in st.confidence.tolist()] if st.confidence is not None else None
        out["candidates"] = len(cand)
    return out


def run_sample(llm: LLM, sample: dict, base: BlockTopKPolicy, variants: dict[str, BlockTopKPolicy],
               dump: Path | None = None) -> dict:
    ids, ps = sample["ids"], llm.engine_config.page_size
    split = base.question_start(len(ids))
    # the context alone, prefilled once with sinks + window (topk=0: no selection at its end)
    runner = Runner(llm.model, dataclasses.replace(base, topk=0), llm.engine_config)
    seq = runner.new_sequence(len(ids) + 16)
    t0 = time.perf_counter()
    runner.prefill(seq, ids[:split])
    prefill_s = time.perf_counter() - t0
    lo, hi = sample["needle_tokens"]
    needle_pages = set(range(lo // ps, (hi - 1) // ps + 1))
    res = {k: sample[k] for k in ("tokens", "depth", "number")} | {"prefill_s": round(prefill_s, 2), "answers": {}}
    res["kv_ram_peak_mib"] = round(seq.peak_kv_bytes / 2**20, 1)
    res["kv_disk_mib"] = round(sum(getattr(lkv, "disk_bytes", lambda: 0)() for lkv in seq.cache.layers) / 2**20, 1)
    for j, (name, pol) in enumerate(variants.items()):
        work, restore = branch(llm, seq)
        rows: list[torch.Tensor] = []
        if dump is not None and j == 0:
            pol, rows = capture_rows(pol)
        r = Runner(llm.model, pol, llm.engine_config)
        t1 = time.perf_counter()
        logits = r.ask(work, ids[split:])
        text = greedy(llm, r, work, logits)
        if rows and dump is not None:
            dump_rows(dump / f"{len(ids)}-{sample['number']}.pt", rows, work, needle_pages, sample["number"])
        entry = {"text": text, "correct": sample["number"] in text, "answer_s": round(time.perf_counter() - t1, 2)}
        if pol.k():
            entry |= recall(pol, work, needle_pages)
        res["answers"][name] = entry
        restore()
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # whole run so far
    return res


def run_dense(llm: LLM, sample: dict) -> dict:
    t0 = time.perf_counter()
    g = llm.generate(sample["ids"], max_new_tokens=20, policy="dense")
    return {"text": g.text, "correct": sample["number"] in g.text, "answer_s": round(time.perf_counter() - t0, 2),
            "prefill_s": round(g.stats.prefill_s, 2), "kv_ram_peak_mib": round(g.stats.peak_kv_bytes / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--topk", type=int, nargs="+", default=[8])
    ap.add_argument("--scores", nargs="+", default=[], help="other page scores tried at topk=8 (max, mean, minmax)")
    ap.add_argument("--expand", type=int, nargs="+", default=[1], help="block_topk expand values tried with each --topk")
    ap.add_argument("--resident", default="", help="block_topk resident KV bytes (e.g. 1GiB): tiered cache")
    ap.add_argument("--cold", default="disk", help="cold tier with --resident: disk or ram")
    ap.add_argument("--cold-codec", default="int8", help="cold page codec with --resident: int8, int4, none")
    ap.add_argument("--extra", nargs="+", default=[], metavar="LABEL::KNOBS",
                    help='more block_topk variants, e.g. "z-vote::score=max,aggregate=z,expand=1"')
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--ablate", action="store_true", help="also k=8 without re-encoding the selected pages")
    ap.add_argument("--dense", action="store_true", help="also run dense on the full prompt (fits the window only)")
    ap.add_argument("--depths", type=float, nargs="+", help="needle depths (default: --samples spread over 0-1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longctx.json"))
    ap.add_argument("--needles", type=int, default=0,
                    help="N > 0: one context per length with N needles of different wording at the depths, "
                         "prefilled once, one question per needle (for 1 M tokens)")
    ap.add_argument("--forms", choices=sorted(FORMS), default="calibration",
                    help="with --needles: the needle wordings and questions (held: never used to calibrate anything)")
    ap.add_argument("--contexts", type=int, default=1, help="with --needles: contexts per length, each from the next book")
    ap.add_argument("--default", action="store_true", help="also answer with block_topk's defaults (what ask uses beyond the window)")
    ap.add_argument("--dump-rows", metavar="DIR",
                    help="save the first variant's page ratings per (layer, head, query) row at each "
                         "question (float16 .pt files) for offline study of selection rules")
    ap.add_argument("--heatmap", nargs="+", metavar="JSON", help="no run: plot accuracy by depth x length from result files")
    ap.add_argument("--variant", default="block_topk k=8 e=1", help="the answers plotted by --heatmap")
    ap.add_argument("--png", default=str(ROOT / "docs" / "results" / "longctx-heatmap.png"))
    args = ap.parse_args()
    if args.heatmap:
        print(plot(args.heatmap, args.variant, Path(args.png)))
        return

    llm = LLM(model=args.model, dtype="bfloat16")
    base = BlockTopKPolicy(window=args.window, resident=args.resident, cold=args.cold, cold_codec=args.cold_codec)
    base = base.resolve(llm.config, llm.engine_config)
    variants = {
        f"block_topk k={k}" + (f" e={e}" if e else ""): dataclasses.replace(base, topk=k, expand=e)
        for e in args.expand for k in args.topk
    }
    variants |= {f"block_topk k=8 {s}": dataclasses.replace(base, topk=8, score=s) for s in args.scores if s != base.score}
    for extra in args.extra:
        label, _, knobs = extra.partition("::")
        pol = make_policy("block_topk" + (f":{knobs}" if knobs else ""), window=args.window)
        assert isinstance(pol, BlockTopKPolicy)
        variants[label] = dataclasses.replace(pol, resident=base.resident, cold=base.cold, cold_codec=base.cold_codec)
    if args.ablate:
        variants["block_topk k=8 no re-encode"] = dataclasses.replace(base, topk=8, reencode=False)
    if args.default:
        default = BlockTopKPolicy().resolve(llm.config, llm.engine_config)
        variants[f"default (k={default.k(llm.config)}, heads={default.heads})"] = dataclasses.replace(
            default, resident=base.resident, cold=base.cold, cold_codec=base.cold_codec)
    variants["local (sinks+window)"] = dataclasses.replace(base, topk=0)
    books = sorted(BOOKS.glob("*.txt"))
    rng = random.Random(args.seed)
    results: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.lengths:
        if args.needles:
            depths = args.depths or [i / max(args.needles - 1, 1) for i in range(args.needles)]
            for c in range(args.contexts):
                first = (n + c) % len(books)
                multi = make_multi(llm, haystack(llm, books, first, n, rng), n, depths, rng, FORMS[args.forms])
                print(f"{n}: context {c + 1}/{args.contexts} of {len(multi['context'])} tokens, {len(depths)} needles", flush=True)
                for res in run_multi(llm, multi, base, variants, Path(args.dump_rows) if args.dump_rows else None):
                    results.append(res | {"length": n, "book": books[first].name + " (+ following books)", "forms": args.forms})
                out.write_text(json.dumps({"args": vars(args), "samples": results, "summary": summarise(results)}, indent=1))
            continue
        depths = args.depths or [i / max(args.samples - 1, 1) for i in range(args.samples)]
        for i, depth in enumerate(depths):
            first = (i + n) % len(books)
            book = books[first]
            sample = make_sample(llm, haystack(llm, books, first, n, rng), n, depth, rng)
            res = run_sample(llm, sample, base, variants, Path(args.dump_rows) if args.dump_rows else None) | {"length": n, "book": book.name}
            if args.dense:
                res["answers"]["dense"] = run_dense(llm, sample)
            results.append(res)
            brief = {k: int(v["correct"]) for k, v in res["answers"].items()}
            print(f"{n} depth={depth:.2f} prefill={res['prefill_s']}s rss={res['peak_rss_mib']}MiB "
                  f"kv ram={res['kv_ram_peak_mib']}MiB disk={res['kv_disk_mib']}MiB {brief}", flush=True)
            out.write_text(json.dumps({"args": vars(args), "samples": results, "summary": summarise(results)}, indent=1))
    print_table(summarise(results))


def plot(files: list[str], variant: str, png: Path, bins: int = 5) -> Path:
    """Accuracy heatmap (needle depth in ``bins`` steps x prompt length) of one variant over result files."""
    from longkv.bench.plots import heatmap

    rows = []
    for f in files:
        for res in json.loads(Path(f).read_text())["samples"]:
            a = res["answers"].get(variant)
            if a is not None:
                depth = round(res["depth"] * (bins - 1)) / (bins - 1)
                rows.append({"policy": variant, "depth": depth, "length": res["length"], "score": float(a["correct"]), "status": "ok"})
    png.parent.mkdir(parents=True, exist_ok=True)
    return heatmap(rows, variant, png, f"SmolLM2-135M (8 K window)\n{variant}")


def summarise(results: list[dict]) -> dict:
    table: dict = {}
    for res in results:
        for name, a in res["answers"].items():
            row = table.setdefault(str(res["length"]), {}).setdefault(name, {"n": 0, "correct": 0, "recall": 0, "loops": 0, "ranks": []})
            row["n"] += 1
            row["correct"] += int(a["correct"])
            row["loops"] += int(a.get("loops", False))
            row["recall"] += int(a.get("recall", False))
            if "rank" in a:
                row["ranks"].append(a["rank"])
    return table


def print_table(table: dict) -> None:
    print(f"{'length':>7} | {'policy':<34} | {'accuracy':>9} | {'page recall':>11} | {'loops':>5} | needle page rank")
    for length, rows in table.items():
        for name, r in rows.items():
            rec = f"{r['recall']}/{r['n']}" if "block" in name or "default" in name else "-"
            print(f"{length:>7} | {name:<34} | {r['correct']:>4}/{r['n']:<4} | {rec:>11} | {r.get('loops', 0):>5} | {r['ranks']}")


if __name__ == "__main__":
    main()
