"""Question-aware and question-agnostic compression of a context.

* **question-agnostic**: the context is prefilled and compressed chunk by
  chunk before any question is known; the scores come from the context alone
  (its own last queries, key norms or query statistics). The compressed cache
  can then be forked and asked many questions (a session, a server's shared
  prefix). The question is appended without further compression.
* **question-aware**: the question is known while the context is compressed.
  To keep memory bounded (compression still runs after every chunk) the
  question's queries are first computed by a short forward of the question
  alone at the positions it will occupy, and every compression of the context
  scores with them as its observation window; after the context, the question
  is prefilled for real and a last compression scores with its true queries.

Policies that use no queries (KNorm, Random, StreamingLLM) behave the same in
both modes.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from longkv.attention.dense import attend
from longkv.engine.runner import Runner, Sequence
from longkv.errors import LongKVError

Mode = Literal["question-agnostic", "question-aware"]
MODES: tuple[str, ...] = ("question-agnostic", "question-aware")


def question_queries(runner: Runner, question_ids: list[int], start: int) -> dict[int, torch.Tensor]:
    """Rotated queries of the question alone, as if it sat at ``start``: layer -> (H, W, D).

    W is at most ``runner.query_window`` (the last question tokens). The
    question attends only to itself (causal): no context, so deeper layers'
    queries are an approximation of those the full prompt will produce.
    """
    window = runner.query_window
    out: dict[int, torch.Tensor] = {}

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out[layer] = q[:, -window:].clone()
        return attend(q, k, v, pos, pos)

    ids = torch.tensor(question_ids, dtype=torch.int64)
    positions = torch.arange(start, start + len(question_ids), dtype=torch.int64)
    with torch.inference_mode():
        runner.model.forward(ids, positions, attention, "none")
    return out


def prefill_with_question(
    runner: Runner, seq: Sequence, context_ids: list[int], question_ids: list[int], mode: Mode
) -> torch.Tensor:
    """Prefill context then question under ``mode``; return the logits (V,) after the question.

    Resident KV stays within ``budget + chunk_size`` tokens per layer while the
    context is prefilled (question-agnostic adds the question's tokens at the end).

    Raises:
        LongKVError: unknown mode, or an empty context or question.
    """
    if mode not in MODES:
        raise LongKVError(f"unknown compression mode {mode!r}: use question-aware or question-agnostic")
    if not context_ids or not question_ids:
        raise LongKVError("context and question must both be non-empty: pass some text for each")
    if mode == "question-agnostic":
        compress_context(runner, seq, context_ids)
        return runner.prefill(seq, question_ids, compress=False)
    if runner.policy.needs_queries:
        seq.observation = question_queries(runner, question_ids, seq.next_position + len(context_ids))
    try:
        runner.prefill(seq, context_ids)
    finally:
        seq.observation = {}
    return runner.prefill(seq, question_ids)


def compress_context(runner: Runner, seq: Sequence, context_ids: list[int]) -> None:
    """Question-agnostic: prefill and compress ``context_ids`` into ``seq`` (reuse it with :func:`fork`)."""
    runner.prefill(seq, context_ids)


def fork(seq: Sequence) -> Sequence:
    """An independent copy of a sequence (its compressed cache included), to ask another question."""
    return copy.deepcopy(seq)
