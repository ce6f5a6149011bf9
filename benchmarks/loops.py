"""Which decoding guard keeps `ask` out of repetition loops without costing answers.

Facts worded unlike the needle benchmark's, hidden in public-domain books at
several depths, asked as a person would ask them, answered by ``LLM.ask`` (the
path of ``longkv ask``: auto policy, greedy) under each guard:

* ``off``: plain greedy;
* ``rep1.2``: repetition penalty 1.2 over the generated tokens (CTRL);
* ``dry0.8``: the DRY sequence penalty, multiplier 0.8 (``SamplingParams.dry_multiplier``).

An answer is right when it holds the fact's key phrase (case-insensitive); it
loops when one word 4-gram occurs 3 times or more. Two of the facts repeat
digits or words on purpose (a guard must let them through).

    python benchmarks/loops.py --model "$(../shared/models/get-model smollm2-135m)" \\
        --lengths 8192 16384 --out benchmarks/results/loops-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

BOOKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "books"

# (fact, question, key phrase)
FACTS = [
    ("The locksmith on Harrow Lane keeps the spare key under a blue flowerpot.",
     "Where does the locksmith on Harrow Lane keep the spare key?", "flowerpot"),
    ("Captain Elmsworth named his fishing boat the Silver Heron.",
     "What did Captain Elmsworth name his fishing boat?", "silver heron"),
    ("The code that opens the archive room is 7744111.",
     "Which code opens the archive room?", "7744111"),
    ("Miss Tabitha Crane was born in the little town of Wexbury.",
     "In which town was Miss Tabitha Crane born?", "wexbury"),
    ("The night train to Dunmore leaves every evening at a quarter past six.",
     "When does the night train to Dunmore leave?", "quarter past six"),
    ("Old Doctor Pell always said that the best cure is rest, rest and more rest.",
     "What did Doctor Pell say is the best cure?", "rest"),
]
GUARDS = {"off": {}, "rep1.2": {"repetition_penalty": 1.2}, "dry0.8": {"dry_multiplier": 0.8}}


def loops(text: str) -> bool:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) >= 3


def haystack(llm, book: Path, n_tokens: int, fact: str, depth: float) -> str:  # type: ignore[no-untyped-def]
    ids = llm.encode(book.read_text(encoding="utf-8"))[:n_tokens]
    cut = int(len(ids) * depth)
    head = llm.tokenizer.decode(ids[:cut])
    head = head[: head.rfind(". ") + 2] if ". " in head else head  # the fact starts a sentence
    return head + fact + " " + llm.tokenizer.decode(ids[cut:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or model folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384], help="haystack lengths in tokens")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", help="write the answers and the summary as JSON here")
    args = ap.parse_args()

    from longkv.engine.llm import LLM

    books = sorted(p for p in BOOKS.glob("*.txt") if "alice" not in p.name)
    if not books:
        sys.exit(f"no books under {BOOKS}: run from a checkout with ../shared beside it")
    llm = LLM(args.model)
    rows = []
    for length in args.lengths:
        for i, (fact, question, key) in enumerate(FACTS):
            book, depth = books[i % len(books)], (0.15, 0.35, 0.5, 0.65, 0.8, 0.95)[i]
            text = haystack(llm, book, length, fact, depth)
            for guard, kw in GUARDS.items():
                out = llm.ask(text, question, max_new_tokens=args.max_new_tokens, **{"dry_multiplier": 0.0, **kw})
                answer = out.text.strip()
                rows.append({"length": length, "book": book.name, "depth": depth, "key": key, "guard": guard,
                             "right": key in answer.lower(), "loops": loops(answer), "tokens": len(out.token_ids),
                             "answer": answer})
                print(f"{length:>6} {book.stem[:14]:<14} {guard:<7} right={rows[-1]['right']!s:<5} loops={rows[-1]['loops']!s:<5} {answer[:90]!r}", flush=True)
    summary = {}
    print(f"\n{'guard':<8} {'right':>7} {'loops':>7} {'median tokens':>14}")
    for guard in GUARDS:
        mine = [r for r in rows if r["guard"] == guard]
        summary[guard] = {"right": sum(r["right"] for r in mine), "loops": sum(r["loops"] for r in mine), "n": len(mine),
                          "median_tokens": statistics.median(r["tokens"] for r in mine)}
        s = summary[guard]
        print(f"{guard:<8} {s['right']:>3}/{s['n']:<3} {s['loops']:>3}/{s['n']:<3} {s['median_tokens']:>14}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "lengths": args.lengths, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
