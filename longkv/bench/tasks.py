"""What every benchmark task shares: samples, prompt formats, length fitting, haystacks, scoring.

A :class:`Sample` is one prompt with its reference answers. Generators build
prompts whose length, counted by the model's own tokenizer after the chat
template, is the requested number of tokens (a few tokens under at most): they
grow the filler (haystack tokens, distractor lines, words) by bisection on its
size until the rendered prompt fits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longkv.errors import LongKVError

SHARED_BOOKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "books"


@dataclass
class Sample:
    """One prompt and what a correct answer contains.

    Attributes:
        id: unique within a run, e.g. ``niah/L4000/d0.50/s2`` (resume key, with the policy).
        task: task name (``niah``, ``niah_multikey``, ``vt``, ...).
        length: requested prompt length in tokens.
        prompt: the full rendered prompt text (chat template applied when the model has one).
        references: strings a correct answer must contain.
        depth: where the needle sits, 0.0 (start) to 1.0 (end); ``None`` for depth-free tasks.
        tokens: measured prompt length in tokens (the model's tokenizer).
        max_new_tokens: answer length to generate.
        meta: task-specific facts (keys, distractors, hops, ...).
        question: the question's text as it stands at the end of ``prompt`` (before
            the chat template's tail); ``""`` when the sample names none.
    """

    id: str
    task: str
    length: int
    prompt: str
    references: list[str]
    depth: float | None = None
    tokens: int = 0
    max_new_tokens: int = 16
    meta: dict[str, Any] = field(default_factory=dict)
    question: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)


class PromptFormat:
    """Renders a task's text as the model sees it and counts its tokens.

    With a chat template: ``template([user]) + answer_prefix``; without one:
    ``user + "\\n\\n" + answer_prefix``. ``count`` uses the tokenizer exactly as
    the engine does (no special tokens added: the template writes them).
    """

    def __init__(self, tokenizer: Any, chat: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

    def render(self, user: str, answer_prefix: str = "") -> str:
        if self.chat:
            head = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
            return str(head) + answer_prefix
        return f"{user}\n\n{answer_prefix}"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def fit_length(
    build: Callable[[int], str], count: Callable[[str], int], target: int, hi: int, task: str = "this task"
) -> tuple[str, int, int]:
    """Largest filler size ``n`` in ``[0, hi]`` with ``count(build(n)) <= target``, by bisection.

    ``count(build(n))`` must grow with ``n`` (filler is a prefix of a fixed list).
    Returns ``(text, tokens, n)``.

    Raises:
        LongKVError: even an empty filler exceeds ``target`` (the length is too small for the task).
    """
    lo_text = build(0)
    lo_tokens = count(lo_text)
    if lo_tokens > target:
        raise LongKVError(f"length {target} is too short for {task}: its prompt alone takes {lo_tokens} tokens; pass longer --lengths")
    lo = 0
    best = (lo_text, lo_tokens, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = build(mid)
        tokens = count(text)
        if tokens <= target:
            lo, best = mid, (text, tokens, mid)
        else:
            hi = mid - 1
    return best


# ------------------------------------------------------------------ grids


def parse_lengths(spec: str) -> list[int]:
    """``"1k,4k,8000"`` -> ``[1000, 4000, 8000]`` tokens (``k`` = 1000, as in policy knobs).

    Raises:
        LongKVError: an entry that is not a positive integer.
    """
    out: list[int] = []
    for item in filter(None, (p.strip().lower() for p in spec.split(","))):
        try:
            value = float(item[:-1]) * 1000 if item.endswith("k") else float(item)
        except ValueError:
            raise LongKVError(f"bad length {item!r}: use token counts such as 2k,4k,8000") from None
        if value < 1 or value != int(value):
            raise LongKVError(f"bad length {item!r}: lengths are positive whole token counts, e.g. 2k,4k")
        out.append(int(value))
    if not out:
        raise LongKVError("no lengths given: pass e.g. --lengths 2k,4k")
    return out


def parse_depths(spec: str) -> list[float]:
    """``"0,0.5,1"`` -> depths as fractions of the context; ``"5"`` -> 5 evenly spaced depths from 0 to 1.

    Raises:
        LongKVError: a depth outside [0, 1] or not a number.
    """
    items = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        if len(items) == 1 and "." not in items[0] and int(items[0]) > 1:
            n = int(items[0])
            return [round(i / (n - 1), 4) for i in range(n)]
        depths = [float(p) for p in items]
    except ValueError:
        raise LongKVError(f"bad depths {spec!r}: pass fractions such as 0,0.25,0.5,0.75,1 or a count such as 5") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise LongKVError(f"bad depths {spec!r}: every depth is a fraction between 0 and 1")
    return depths


def sample_rng(seed: int, sample_id: str) -> random.Random:
    """A generator seeded by (seed, sample id): a sample is the same whatever else the run holds."""
    return random.Random(f"{seed}|{sample_id}")


# ------------------------------------------------------------------ haystacks


def default_haystack() -> list[Path]:
    """The books in ``../shared/data/books`` when present, else an empty list."""
    return sorted(SHARED_BOOKS.glob("*.txt")) if SHARED_BOOKS.is_dir() else []


def load_haystack(paths: Sequence[str | Path] | None) -> list[str]:
    """Read haystack text files (whitespace normalised, one string per file).

    Raises:
        LongKVError: no files given and no default books, a missing or binary file, or a near-empty file.
    """
    files = [Path(p) for p in paths] if paths else default_haystack()
    if not files:
        raise LongKVError("no haystack text: pass --haystack FILE... (plain text files)")
    texts = []
    for f in files:
        if not f.is_file():
            raise LongKVError(f"haystack file {f} does not exist: pass existing text files with --haystack")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LongKVError(f"haystack file {f} is not UTF-8 text: pass plain text files") from None
        text = re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()
        if len(text) < 1000:
            raise LongKVError(f"haystack file {f} holds under 1000 characters: pass longer text files")
        texts.append(text)
    return texts


def haystack_slice(texts: list[str], rng: random.Random, chars: int) -> str:
    """About ``chars`` characters of real text starting at a paragraph in a random file (wrapping around)."""
    text = texts[rng.randrange(len(texts))]
    start = rng.randrange(len(text))
    para = text.find("\n\n", start)
    start = para + 2 if 0 <= para < len(text) - 1000 else 0
    out = text[start : start + chars]
    while len(out) < chars:  # short file: continue from the top, a paragraph break between
        out += "\n\n" + text[: chars - len(out)]
    return out


# ------------------------------------------------------------------ scoring

_DIGITS = re.compile(r"\d+")


def score_exact_number(answer: str, value: str) -> float:
    """1.0 when ``value`` appears in ``answer`` as a whole number, else 0.0.

    Thousands separators are ignored (``1,234,567`` matches ``1234567``), but a
    longer digit run that contains the value (``12345678``) or a number with a
    digit wrong does not match.
    """
    joined = re.sub(r"(?<=\d)[,\u202f](?=\d{3})", "", answer)
    return 1.0 if value in _DIGITS.findall(joined) else 0.0


def score_recall(answer: str, references: list[str]) -> float:
    """RULER's ``string_match_all`` (Hsieh et al. 2024): the fraction of references found in the answer.

    Case-insensitive substring match per reference; 1.0 only when every one is present.
    """
    if not references:
        return 0.0
    low = answer.lower()
    return sum(ref.lower() in low for ref in references) / len(references)
