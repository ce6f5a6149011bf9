"""The compression benchmark's held split: its numbers and its digit-exact scoring."""

from __future__ import annotations

import random
import sys
from itertools import pairwise
from pathlib import Path

import pytest

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


# --------------------------------------------------------------------------- the real-question set

def test_a_key_phrase_counts_whole_numbers_and_any_case() -> None:
    from questions import matches

    assert matches("The guard searches the last 512 tokens.", ["512"])
    assert not matches("It searches 5120 tokens.", ["512"])  # not inside a longer number
    assert not matches("version 1.512", ["512"])
    assert matches("It costs 3,072 tokens", ["3072", "3,072"])
    assert matches("temperature 0.7.", ["0.7"]) and not matches("temperature 0.75", ["0.7"])
    assert matches("set LONGKV_HOME", ["longkv_home"]) and matches("Mr. de deer", ["De Deer"])
    assert not matches("The answer is 32.", ["24", "twenty-four"])


def test_every_question_has_its_evidence_once_in_its_file_and_an_answer_in_it() -> None:
    from questions import load_questions, matches, source_root

    qs = load_questions()
    assert len({q["id"] for q in qs}) == len(qs) == 24
    assert {q["source"] for q in qs} == {"repo", "stdlib", "book"}
    for q in qs:
        path = source_root(q["source"]) / q["file"]
        if q["source"] == "book" and not path.exists():
            continue  # ../shared is not beside this checkout: the book questions cannot be checked
        text = path.read_text(errors="replace")
        assert text.count(q["evidence"]) >= 1, q["id"]
        if q["source"] == "book":
            assert text.count(q["evidence"]) == 1, q["id"]  # one place in the book
        assert matches(q["evidence"], q["answers"]) or q["id"] == "repo-kill-wait", q["id"]


@pytest.mark.parametrize("qid", ["repo-dense-below", "stdlib-difflib-autojunk", "dracula-piccadilly-number"])
@pytest.mark.parametrize("depth", [0.15, 0.85])
def test_a_sample_holds_the_evidence_at_its_depth_within_its_length(qid: str, depth: float) -> None:
    from questions import load_questions, make_docs, source_root

    q = next(q for q in load_questions() if q["id"] == qid)
    if not (source_root(q["source"]) / q["file"]).exists():
        pytest.skip("../shared/data/books is not beside this checkout")
    docs = make_docs(q, 30_000, depth, random.Random(0))
    total = sum(len(d.text) for d in docs)
    assert 0.9 * 30_000 <= total <= 30_000
    text = "".join(d.text for d in docs)
    assert text.count(q["evidence"]) >= 1
    at = text.index(q["evidence"]) / total
    assert abs(at - depth) < 0.2, at  # the answer's file (or passage) sits about where it was asked to
    names = [d.name for d in docs]
    assert len(set(names)) == len(names)
    if q["source"] == "repo":
        assert all(n.startswith("longkv/") for n in names)
