"""RULER-style generators: determinism, exact sizing on two tokenizers, references that really answer the task."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from longkv.bench.ruler import TASKS, RulerSuite, RulerTask, parse_tasks, pseudo_words, spread
from longkv.bench.runner import score
from longkv.bench.tasks import PromptFormat, load_haystack
from longkv.errors import LongKVError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
pytestmark = pytest.mark.skipif(not (SHARED / "models" / "get-model").exists(), reason="../shared (models, books) is absent")

# Line-based haystacks grow one line at a time (a UUID line is ~60 tokens); cwe adds a rare word in 2-3 numbered lines.
TOLERANCE = {"niah_multikey_2": 30, "niah_multikey_3": 80, "cwe": 16}


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def fmt(request: pytest.FixtureRequest) -> PromptFormat:
    from longkv.bench.backends import load_tokenizer

    path = subprocess.run([str(SHARED / "models" / "get-model"), request.param], capture_output=True, text=True, check=True).stdout
    return PromptFormat(load_tokenizer(path.strip()))


@pytest.fixture(scope="module")
def hay() -> list[str]:
    return load_haystack(None)


@pytest.mark.parametrize("task", TASKS)
def test_task_sizes_and_determinism(fmt: PromptFormat, hay: list[str], task: str) -> None:
    t = RulerTask(task, hay)
    for length in (1200, 3000):
        s = t.make(fmt, length, 0, seed=11)
        assert s.tokens == fmt.count(s.prompt)
        assert length - TOLERANCE.get(task, 8) <= s.tokens <= length, (task, length, s.tokens)
        assert s.references and all(r for r in s.references)
    assert t.make(fmt, 1200, 0, seed=11) == t.make(fmt, 1200, 0, seed=11)
    assert t.make(fmt, 1200, 1, seed=11).prompt != t.make(fmt, 1200, 0, seed=11).prompt


def test_references_answer_the_task(fmt: PromptFormat, hay: list[str]) -> None:
    for task in TASKS:
        s = RulerTask(task, hay).make(fmt, 2500, 0, seed=5)
        body = s.prompt
        if task.startswith("niah"):
            for ref in s.references:
                assert re.search(rf"is: {re.escape(ref)}\.", body), (task, ref)
        if task == "niah_multikey_2":
            assert body.count("One of the special magic numbers for") > 50  # every line a distractor
        if task == "vt":
            first, *rest = s.references
            value = re.search(rf"VAR {first} = (\d+)\.", body).group(1)
            for prev, var in zip(s.references, rest, strict=False):
                assert f"VAR {var} = VAR {prev}." in body
            assert f"the value {value}" in body
        if task == "cwe":
            words = re.findall(r"^\d+\. (\w+)$", body, flags=re.M)
            top = [w for w, _ in Counter(words).most_common(10)]
            assert sorted(top) == sorted(s.references)
        if task == "fwe":
            text = body.split("occurs.\n\n", 1)[1].split("\n\nQuestion", 1)[0]
            counts = Counter(text.split())
            assert [counts[r] for r in s.references] == sorted((counts[r] for r in s.references), reverse=True)
            assert min(counts[r] for r in s.references) >= sorted(counts.values(), reverse=True)[2]
        # a perfect answer scores 1, an empty one 0
        assert score(s, " ".join(s.references)) == 1.0 and score(s, "") == 0.0


def test_parse_tasks_and_helpers(hay: list[str], fmt: PromptFormat) -> None:
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("niah_single,vt") == ["niah_single_1", "niah_single_2", "niah_single_3", "vt"]
    with pytest.raises(LongKVError, match="unknown RULER task"):
        parse_tasks("qa_1")
    with pytest.raises(LongKVError, match="length 60 is too short for niah_multivalue"):
        RulerTask("niah_multivalue", hay).make(fmt, 60, 0, 0)
    with pytest.raises(LongKVError, match="--tasks is empty"):
        parse_tasks(" ")
    words = pseudo_words(__import__("random").Random(0), 5000)
    assert len(set(words)) == 5000
    import random

    assert spread(["A", "B"], list("xyz"), random.Random(1)).index("A") < spread(["A", "B"], list("xyz"), random.Random(1)).index("B")
    suite = RulerSuite(["vt", "cwe"], hay).samples(fmt, [1000, 1500], None, 2, 0)
    assert [s.id for s in suite][:3] == ["vt/L1000/s0", "vt/L1000/s1", "cwe/L1000/s0"] and len(suite) == 8


def test_question_ids_are_the_prompts_tail_from_the_question_on(hay: list[str]) -> None:
    """A question-aware run names each sample's question and the template's tail, and nothing else."""
    from longkv.bench.backends import make_backend

    path = subprocess.run([str(SHARED / "models" / "get-model"), "smollm2-135m"], capture_output=True, text=True, check=True).stdout.strip()
    be = make_backend("longkv", path, threads=1, question_aware=True)
    fmt = PromptFormat(be.tokenizer)
    for task in ("niah_single_2", "niah_multiquery", "vt", "cwe", "fwe"):
        s = RulerTask(task, hay).make(fmt, 1200, 0, seed=3)
        assert s.question.split()[0] in ("Which", "List", "Question:") and s.question in s.prompt
        ids, qids = be.llm.prompt_ids(s.prompt), be.question_ids(s.prompt, s.question)
        assert qids is not None and ids[-len(qids) :] == qids
        assert be.llm.tokenizer.decode(qids).startswith(s.question)  # starts at the question, not a token before it
        assert be.llm.tokenizer.decode(ids[: -len(qids)]).endswith("\n\n")  # the text before it ends on the blank line
    be.question_aware = False
    assert be.question_ids(s.prompt, s.question) is None
    be.question_aware = True
    with pytest.raises(LongKVError, match="not in its prompt"):
        be.question_ids("no question here", s.question)
