"""Needle-in-a-haystack: one fact hidden at a chosen depth of long real text.

After the "needle in a haystack" test (G. Kamradt, 2023) in the form RULER
(Hsieh et al. 2024) uses: the needle is ``One of the special magic numbers for
<key> is: <7-digit value>.``; the question asks for the number of that key. A
sample is scored 1 when the answer holds the value as a whole number
(:func:`~longkv.bench.tasks.score_exact_number`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longkv.bench.tasks import PromptFormat, Sample, fit_length, haystack_slice, sample_rng

ADJECTIVES = (
    "amber", "bitter", "brave", "calm", "clever", "crimson", "dusty", "eager", "fancy", "gentle", "golden", "hollow",
    "humble", "icy", "jolly", "lively", "lucky", "misty", "noble", "olive", "proud", "quiet", "rapid", "rusty",
    "silent", "silver", "steady", "stormy", "sunny", "tender", "velvet", "wild", "wise", "young", "zesty", "frozen",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "beacon", "canyon", "cedar", "comet", "falcon", "ferry", "garden", "harbor", "island",
    "kettle", "lantern", "meadow", "mirror", "orchard", "otter", "pebble", "pigeon", "quarry", "raven", "river",
    "saddle", "spruce", "tiger", "tunnel", "violin", "walnut", "willow", "window", "wizard", "yacht", "zebra",
)  # fmt: skip


def random_key(rng: random.Random) -> str:
    """A two-word key such as ``silver-otter`` (36 x 33 combinations)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random) -> str:
    """A 7-digit decimal string without a leading zero."""
    return str(rng.randrange(1_000_000, 10_000_000))


def insert_at_depth(context: str, needle: str, depth: float) -> str:
    """Put ``needle`` into ``context`` at the first sentence end after ``depth`` (0..1) of its characters."""
    if depth <= 0.0 or not context:
        return f"{needle} {context}"
    if depth >= 1.0:
        return f"{context} {needle}"
    p = int(depth * len(context))
    cut = min((i for i in (context.find(s, p, p + 400) for s in (". ", ".\n", "? ", "! ")) if i >= 0), default=-1)
    p = cut + 1 if cut >= 0 else p
    return f"{context[:p]} {needle} {context[p:].lstrip()}"


@dataclass
class NiahTask:
    """Generator of needle-in-a-haystack samples over real text.

    Attributes:
        haystack: haystack texts (see :func:`~longkv.bench.tasks.load_haystack`).
        max_new_tokens: answer length to generate (a 7-digit number is 3-7 tokens).
    """

    haystack: list[str]
    max_new_tokens: int = 16
    name: str = "niah"

    def sample_id(self, length: int, depth: float, index: int) -> str:
        return f"{self.name}/L{length}/d{depth:.2f}/s{index}"

    def make(self, fmt: PromptFormat, length: int, depth: float, index: int, seed: int) -> Sample:
        """The ``index``-th sample of the (length, depth) cell: same seed, same sample.

        Raises:
            LongKVError: ``length`` too short to hold the instructions and the needle.
        """
        sid = self.sample_id(length, depth, index)
        rng = sample_rng(seed, sid)
        key, value = random_key(rng), random_number(rng)
        needle = f"One of the special magic numbers for {key} is: {value}."
        # ~4 characters per token in English prose; 6 leaves room for tokenizers that pack more.
        hay_ids = fmt.encode(haystack_slice(self.haystack, rng, length * 6))
        head = "Some special magic numbers are hidden within the following text. Make sure to memorize them. I will quiz you about them afterwards.\n\n"
        tail = f"\n\nWhat is the special magic number for {key} mentioned in the text above? Answer with the number only."
        prefix = f"The special magic number for {key} mentioned in the text is"

        def build(n: int) -> str:
            context = insert_at_depth(fmt.decode(hay_ids[:n]).strip(), needle, depth)
            return fmt.render(head + context + tail, prefix)

        prompt, tokens, _ = fit_length(build, fmt.count, length, len(hay_ids), self.name)
        meta = {"key": key, "needle": needle}
        return Sample(sid, self.name, length, prompt, [value], depth, tokens, self.max_new_tokens, meta, tail.strip())

    def samples(self, fmt: PromptFormat, lengths: list[int], depths: list[float], n: int, seed: int) -> list[Sample]:
        """Every sample of the grid, ordered by length, then depth, then index."""
        return [self.make(fmt, L, d, i, seed) for L in lengths for d in depths for i in range(n)]
