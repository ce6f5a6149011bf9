"""RULER-style synthetic tasks, written from the task descriptions of Hsieh et al. 2024
("RULER: What's the Real Context Size of Your Long-Context Language Models?", NVIDIA).

Families (sample scoring: :func:`~longkv.bench.tasks.score_recall`, the share of
references found in the answer, case-insensitive):

* ``niah_single_1/2/3``: one needle; noise haystack + number, real-text haystack
  + number, real-text haystack + UUID.
* ``niah_multikey_1/2/3``: the needle among distractor needles with other keys:
  3 distractors in real text; every line a distractor (word keys, numbers);
  every line a distractor with UUID keys and values.
* ``niah_multivalue``: four values under the same key, all asked for.
* ``niah_multiquery``: four keys, all asked for at once.
* ``vt``: variable tracking, a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... in
  noise; name every variable that ends up holding the value (multi-hop).
* ``cwe``: common-words extraction, the 10 words repeated most in a numbered list.
* ``fwe``: frequent-words extraction, the 3 most frequent pseudo-words of a text
  drawn from a Zipf distribution.

The two QA families need SQuAD and HotpotQA, which this harness does not ship:
they are left out. Every prompt is fitted to the requested token count by the
model's tokenizer (a few tokens under at most).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from longkv.bench.niah import random_key, random_number
from longkv.bench.tasks import PromptFormat, Sample, fit_length, haystack_slice, sample_rng
from longkv.errors import LongKVError

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
SYLLABLES = ("ba", "ko", "ri", "mu", "te", "sal", "dor", "vin", "lu", "pe", "zan", "qui", "fo", "ger", "ish", "nor", "tav", "el", "om", "yu")


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pseudo_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (no tokenizer knows them as one piece)."""
    while len(SYLLABLES) ** syllables < 4 * n:  # room to draw n distinct words quickly
        syllables += 1
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(SYLLABLES) for _ in range(syllables))] = None
    return list(out)


def spread(items: list[str], filler: list[str], rng: random.Random) -> list[str]:
    """``filler`` with ``items`` inserted at random places, in their order."""
    slots = sorted(rng.sample(range(len(filler) + 1), len(items))) if len(filler) + 1 >= len(items) else [0] * len(items)
    out, prev = [], 0
    for slot, item in zip(slots, items, strict=True):
        out.extend(filler[prev:slot])
        out.append(item)
        prev = slot
    return out + filler[prev:]


@dataclass
class Built:
    """A task's text around its filler: ``body(n)`` is the context with ``n`` filler units."""

    body: Callable[[int], str]
    units: int  # most filler units available
    head: str
    tail: str
    prefix: str
    references: list[str]
    max_new_tokens: int
    meta: dict[str, object]
    finalize: Callable[[int], list[str]] | None = None  # references that depend on the fitted filler size


@dataclass
class RulerTask:
    """One RULER task family member; :meth:`make` builds its samples.

    Attributes:
        name: one of :data:`TASKS`.
        haystack: real texts for the essay-style haystacks.
    """

    name: str
    haystack: list[str]

    def sample_id(self, length: int, index: int) -> str:
        return f"{self.name}/L{length}/s{index}"

    def make(self, fmt: PromptFormat, length: int, index: int, seed: int) -> Sample:
        """The ``index``-th sample at ``length`` tokens. Raises LongKVError when the length cannot hold the task."""
        sid = self.sample_id(length, index)
        rng = sample_rng(seed, sid)
        b = BUILDERS[self.name](self, fmt, rng, length)
        prompt, tokens, n = fit_length(lambda n: fmt.render(b.head + b.body(n) + b.tail, b.prefix), fmt.count, length, b.units, self.name)
        refs = b.finalize(n) if b.finalize is not None else b.references
        return Sample(sid, self.name, length, prompt, refs, None, tokens, b.max_new_tokens, dict(b.meta), b.tail.strip())

    def samples(self, fmt: PromptFormat, lengths: list[int], depths: object, n: int, seed: int) -> list[Sample]:
        return [self.make(fmt, L, i, seed) for L in lengths for i in range(n)]


# ------------------------------------------------------------------ needle families

_HEAD = "Hidden in the text below are some special magic {kind}s. Remember them: questions about them follow the text.\n\n"


def _essay_body(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int, needles: list[str]) -> tuple[Callable[[int], str], int]:
    """Real text of ``n`` tokens with the needles at random sentence ends."""
    ids = fmt.encode(haystack_slice(task.haystack, rng, length * 6))
    depths = sorted(rng.random() for _ in needles)

    def body(n: int) -> str:
        text = fmt.decode(ids[:n]).strip()
        for d, needle in sorted(zip(depths, needles, strict=True), reverse=True):  # from the end: earlier cuts stay valid
            p = int(d * len(text))
            cut = text.find(". ", p)
            p = cut + 1 if 0 <= cut < p + 400 else p
            text = f"{text[:p]} {needle} {text[p:].lstrip()}"
        return text

    return body, len(ids)


def _noise_body(rng: random.Random, length: int, needles: list[str]) -> tuple[Callable[[int], str], int]:
    units = length // 3
    spots = sorted(rng.random() for _ in needles)  # needles keep their order (a variable chain reads top-down)

    def body(n: int) -> str:
        lines = [NOISE[i % len(NOISE)] for i in range(n)]
        for s, needle in sorted(zip(spots, needles, strict=True), reverse=True):
            lines.insert(int(s * len(lines)), needle)
        return " ".join(lines)

    return body, units


def _lines_body(rng: random.Random, length: int, target: str, make_line: Callable[[], str]) -> tuple[Callable[[int], str], int]:
    """Every line a distractor needle; ``target`` at a random line."""
    units = length // 8
    lines = [make_line() for _ in range(units)]
    spot = rng.random()

    def body(n: int) -> str:
        chosen = lines[:n]
        chosen.insert(int(spot * len(chosen)), target)
        return "\n".join(chosen)

    return body, units


def _needle(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _single(haystack: str, kind: str) -> Callable[[RulerTask, PromptFormat, random.Random, int], Built]:
    def build(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int) -> Built:
        key = random_key(rng)
        value = random_uuid(rng) if kind == "uuid" else random_number(rng)
        needle = _needle(key, value, kind)
        body, units = _noise_body(rng, length, [needle]) if haystack == "noise" else _essay_body(task, fmt, rng, length, [needle])
        return Built(
            body, units, _HEAD.format(kind=kind), f"\n\nWhich special magic {kind} for {key} does the text above mention?",
            f"The special magic {kind} for {key} mentioned in the text is", [value], 48 if kind == "uuid" else 16, {"key": key},
        )  # fmt: skip

    return build


def _multikey(mode: int) -> Callable[[RulerTask, PromptFormat, random.Random, int], Built]:
    kind = "uuid" if mode == 3 else "number"

    def build(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int) -> Built:
        def make_key() -> str:
            return random_uuid(rng) if mode == 3 else random_key(rng)

        def value() -> str:
            return random_uuid(rng) if kind == "uuid" else random_number(rng)

        key, val = make_key(), value()
        target = _needle(key, val, kind)
        if mode == 1:
            others: set[str] = set()
            while len(others) < 3:
                if (k := make_key()) != key:
                    others.add(k)
            needles = [target] + [_needle(k, value(), kind) for k in sorted(others)]
            rng.shuffle(needles)
            body, units = _essay_body(task, fmt, rng, length, needles)
        else:

            def line() -> str:
                k = make_key()
                while k == key:
                    k = make_key()
                return _needle(k, value(), kind)

            body, units = _lines_body(rng, length, target, line)
        return Built(
            body, units, _HEAD.format(kind=kind), f"\n\nWhich special magic {kind} for {key} does the text above mention?",
            f"The special magic {kind} for {key} mentioned in the text is", [val], 48 if kind == "uuid" else 16, {"key": key},
        )  # fmt: skip

    return build


def _multivalue(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int) -> Built:
    key = random_key(rng)
    values = list(dict.fromkeys(random_number(rng) for _ in range(4)))
    body, units = _essay_body(task, fmt, rng, length, [_needle(key, v, "number") for v in values])
    return Built(
        body, units, _HEAD.format(kind="number"), f"\n\nList every special magic number for {key} that the text above mentions.",
        f"The special magic numbers for {key} mentioned in the text are", values, 64, {"key": key},
    )  # fmt: skip


def _multiquery(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int) -> Built:
    keys: list[str] = []
    while len(keys) < 4:
        if (k := random_key(rng)) not in keys:
            keys.append(k)
    values = [random_number(rng) for _ in keys]
    body, units = _essay_body(task, fmt, rng, length, [_needle(k, v, "number") for k, v in zip(keys, values, strict=True)])
    names = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return Built(
        body, units, _HEAD.format(kind="number"), f"\n\nWhich special magic numbers for {names} does the text above mention?",
        f"The special magic numbers for {names} mentioned in the text are", values, 64, {"keys": keys},
    )  # fmt: skip


def _variable_tracking(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int, hops: int = 4) -> Built:
    names: list[str] = []
    while len(names) < hops + 1:
        if (v := "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))) not in names:
            names.append(v)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    body, units = _noise_body(rng, length, chain)  # spots are sorted, so the chain keeps its order
    return Built(
        body, units, "Follow the variable assignments hidden in the text below; some variables copy the value of others.\n\n",
        f"\n\nQuestion: which variables end up holding the value {value}? Name every one of them.",
        f"Answer: following the assignments in the text, the variables holding the value {value} are:", names, 40,
        {"hops": hops},
    )  # fmt: skip


def _common_words(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int) -> Built:
    common_n = 10
    # Short prompts cannot hold 30 copies of 10 words; scale repeats so the common words stay a minority.
    common_rep, rare_rep = (30, 3) if length >= 8000 else (10, 2) if length >= 2000 else (4, 1)
    words = pseudo_words(rng, common_n + length // 4, syllables=2)
    common, rare = words[:common_n], words[common_n:]
    orders = [rng.random() for _ in range(len(words) * common_rep)]

    def body(n: int) -> str:
        pool = common * common_rep + [w for w in rare[:n] for _ in range(rare_rep)]
        order = sorted(range(len(pool)), key=lambda i: orders[i % len(orders)] + i * 1e-9)
        return "\n".join(f"{i + 1}. {pool[j]}" for i, j in enumerate(order))

    if fmt.count(body(0)) > length:
        raise LongKVError(f"length {length} is too short for cwe: pass --lengths of at least 1k")
    return Built(
        body, len(rare), "Below is a numbered list of words. A few of them are repeated much more often than the rest.\n\n",
        "\n\nQuestion: which 10 words occur most often in the list above?",
        "Answer: the 10 words that occur most often in the list are:", common, 96, {"common_rep": common_rep, "rare_rep": rare_rep},
    )  # fmt: skip


def _frequent_words(task: RulerTask, fmt: PromptFormat, rng: random.Random, length: int, alpha: float = 2.0) -> Built:
    vocab = pseudo_words(rng, 400)
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    stream = rng.choices(vocab, weights=weights, k=length)

    def top3(n: int) -> list[str]:
        counts: dict[str, int] = {}
        for w in stream[:n]:
            counts[w] = counts.get(w, 0) + 1
        return sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))[:3]

    return Built(
        lambda n: " ".join(stream[:n]), len(stream), "Below is a text of made-up words. Keep count of how often each word occurs.\n\n",
        "\n\nQuestion: which three made-up words occur most often in the text above? Give just the words.",
        "Answer: the three most frequent words in the text are:", [], 32, {"alpha": alpha}, top3,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[RulerTask, PromptFormat, random.Random, int], Built]] = {
    "niah_single_1": _single("noise", "number"),
    "niah_single_2": _single("essay", "number"),
    "niah_single_3": _single("essay", "uuid"),
    "niah_multikey_1": _multikey(1),
    "niah_multikey_2": _multikey(2),
    "niah_multikey_3": _multikey(3),
    "niah_multivalue": _multivalue,
    "niah_multiquery": _multiquery,
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
}
TASKS = tuple(BUILDERS)


def parse_tasks(spec: str) -> list[str]:
    """``"all"`` or comma-separated task names (a family prefix such as ``niah_single`` selects its members).

    Raises:
        LongKVError: an empty spec, or a name that matches no task.
    """
    if not spec.strip():
        raise LongKVError("--tasks is empty: pass 'all' or task names such as niah_single_2,vt")
    if spec.strip() == "all":
        return list(TASKS)
    out: list[str] = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [t for t in TASKS if t == item or t.startswith(item + "_")]
        if not hits:
            raise LongKVError(f"unknown RULER task {item!r}: choose from {', '.join(TASKS)} (QA tasks are not included)")
        out.extend(h for h in hits if h not in out)
    return out


@dataclass
class RulerSuite:
    """Several RULER tasks run as one grid (length x task x sample)."""

    tasks: list[str]
    haystack: list[str]

    def samples(self, fmt: PromptFormat, lengths: list[int], depths: object, n: int, seed: int) -> list[Sample]:
        return [RulerTask(t, self.haystack).make(fmt, L, i, seed) for L in lengths for t in self.tasks for i in range(n)]
