"""The compression benchmark's held split: its numbers and its digit-exact scoring."""

from __future__ import annotations

import random
import sys
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compression import edits, held_number, score


def test_an_answer_counts_only_with_every_digit() -> None:
    assert score("3391827", " 3391827.\n\nThe answer is 3391827.", exact=True) == {
        "correct": True, "lost_digits": False, "number": "3391827", "answer": "3391827"}
    assert score("3391827", "3,391,827 crates", exact=True)["correct"]
    last = score("3391827", "3391821", exact=True)  # the last digit changed
    assert not last["correct"] and last["lost_digits"]
    cut = score("1370395", " 1370.\n\nThe atlas", exact=True)  # the tail cut off
    assert not cut["correct"] and cut["lost_digits"] and cut["number"] == "1370"
    assert score("1718728", "171872 crates", exact=True)["lost_digits"]  # a digit dropped
    other = score("2651728", " 1851 sheep.", exact=True)  # another number of the text: wrong, not a lost digit
    assert not other["correct"] and not other["lost_digits"]
    assert not score("2651728", "a hundred", exact=True)["lost_digits"]
    assert not score("2651728", "1 or 2651728", exact=True)["correct"]  # exact: the first number is the answer
    assert score("2651728", "1 or 2651728", exact=False)["correct"]  # the benchmark's own form: anywhere


def test_edit_distance() -> None:
    assert [edits("3391827", x) for x in ("3391827", "3391821", "339182", "33918277", "1234")] == [0, 1, 1, 1, 6]


def test_held_numbers_have_seven_digits_and_half_repeat_one() -> None:
    rng = random.Random(0)
    nums = [held_number(rng) for _ in range(400)]
    assert all(len(n) == 7 and n.isdigit() and n[0] != "0" for n in nums)
    doubled = sum(any(a == b for a, b in pairwise(n)) for n in nums)
    assert 0.5 * 400 < doubled < 0.8 * 400  # half forced, plus those random digits repeat by chance (~47 %)
