"""Sampling functions: greedy, temperature, top-k, top-p, seeds, validation."""

from __future__ import annotations

import pytest
import torch

from longkv.engine.sampling import SamplingParams, filter_logits, make_generator, sample
from longkv.errors import LongKVError

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_takes_argmax() -> None:
    assert sample(LOGITS, SamplingParams(temperature=0.0), make_generator(0)) == 1


def test_top_k_keeps_k_best() -> None:
    out = filter_logits(LOGITS, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]
    draws = {sample(LOGITS, SamplingParams(temperature=1.0, top_k=2), make_generator(s)) for s in range(50)}
    assert draws == {1, 2}


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.softmax(LOGITS, -1)  # sorted: idx1 .63, idx2 .23, idx0 .09, ...
    out = filter_logits(LOGITS, top_k=0, top_p=0.8)
    kept = torch.isfinite(out).nonzero().squeeze(1).tolist()
    assert sorted(kept) == [1, 2]
    assert probs[1] + probs[2] >= 0.8 > probs[1]
    assert torch.isfinite(filter_logits(LOGITS, 0, 0.01)).sum() == 1  # the top token always stays


def test_min_p_keeps_tokens_near_the_most_likely() -> None:
    probs = torch.softmax(LOGITS, -1)  # .63, .23, .09, .05, .01 (indices 1, 2, 0, 3, 4)
    kept = torch.isfinite(filter_logits(LOGITS, 0, 1.0, min_p=0.1)).nonzero().squeeze(1).tolist()
    assert sorted(kept) == [0, 1, 2] and probs[0] >= 0.1 * probs[1] > probs[3]
    assert torch.isfinite(filter_logits(LOGITS, 0, 1.0, min_p=1.0)).sum() == 1
    draws = {sample(LOGITS, SamplingParams(temperature=1.0, min_p=0.3), make_generator(s)) for s in range(50)}
    assert draws == {1, 2}  # .23 >= .3 * .63 > .09


def test_seed_reproduces_and_differs() -> None:
    p = SamplingParams(temperature=1.5)
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(20)]
    g2 = make_generator(7)
    b = [sample(logits, p, g2) for _ in range(20)]
    g3 = make_generator(8)
    c = [sample(logits, p, g3) for _ in range(20)]
    assert a == b and a != c


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": -1}, {"min_p": 1.5}]
)
def test_bad_values_raise(kwargs: dict) -> None:
    with pytest.raises(LongKVError):
        SamplingParams(**kwargs)


def test_repetition_penalty_lowers_seen_tokens_only() -> None:
    from longkv.engine.sampling import penalize_repeats

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = penalize_repeats(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive halved, negative doubled, unseen unchanged
    assert penalize_repeats(logits, [0], 1.0) is logits
    params = SamplingParams(repetition_penalty=2.0)
    assert sample(torch.tensor([3.0, 2.0]), params, make_generator(0), [0]) == 1  # greedy moves off the repeat
    with pytest.raises(LongKVError, match="repetition_penalty must be > 0"):
        SamplingParams(repetition_penalty=0.0)


def test_loop_guard_finds_the_runs_a_token_would_extend() -> None:
    from longkv.engine.sampling import repeat_runs

    assert repeat_runs([1, 2, 3, 9, 1, 2, 3], 2) == {9: 3}  # "1 2 3" was followed by 9 once
    assert repeat_runs([5, 1, 2, 8, 4, 1, 2, 7, 1, 2], 2) == {8: 2, 7: 2}
    assert repeat_runs([7, 7], 2) == {}  # one repeated token is no run
    assert repeat_runs([7, 7, 7], 2) == {7: 2}
    assert repeat_runs([1, 2, 3, 9, 1, 2, 3], 4) == {}  # within the allowed length


def test_loop_guard_breaks_a_loop_and_is_off_by_default() -> None:
    from longkv.engine.sampling import penalize_loops

    history = [1, 2, 3, 9, 1, 2, 3]
    logits = torch.zeros(12)
    logits[9], logits[4] = 2.0, 1.0  # the loop's next token leads by 1.0
    params = SamplingParams(dry_multiplier=0.8)
    out = penalize_loops(logits, history, params)
    expected = logits.clone()
    expected[9] -= 0.8 * 1.75 ** (3 - 2)  # 1.4: more than the lead
    assert torch.equal(out, expected) and torch.equal(logits[9], torch.tensor(2.0))
    assert sample(logits, params, make_generator(0), history) == 4
    assert sample(logits, SamplingParams(), make_generator(0), history) == 9  # off: the loop goes on
    assert sample(logits, params, make_generator(0), [9, 9]) == 9  # no run: nothing changes
    with pytest.raises(LongKVError, match="dry_multiplier must be >= 0, got -1.0: use 0 to turn the loop guard off"):
        SamplingParams(dry_multiplier=-1.0)
    with pytest.raises(LongKVError, match="dry_base must be > 1, got 1.0"):
        SamplingParams(dry_multiplier=0.8, dry_base=1.0)
    with pytest.raises(LongKVError, match="dry_allowed_length must be >= 1, got 0"):
        SamplingParams(dry_allowed_length=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": "4"}, "max_new_tokens must be a whole number, got '4'"),
        ({"max_new_tokens": 4.0}, "max_new_tokens must be a whole number, got 4.0"),
        ({"top_k": True}, "top_k must be a whole number, got True"),
        ({"temperature": float("nan")}, "temperature must be a number, got nan"),
        ({"top_p": "0.9"}, "top_p must be a number, got '0.9'"),
    ],
)
def test_values_of_the_wrong_type_are_refused_by_name(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(LongKVError, match=match):
        SamplingParams(**kwargs)
