"""Question-aware and question-agnostic compression of a context.

* **question-agnostic**: the context is prefilled and compressed chunk by
  chunk before any question is known; the scores come from the context alone
  (its own last queries, key norms or query statistics). The compressed cache
  can then be forked and asked many questions (a session, a server's shared
  prefix). The question is appended without further compression.
* **question-aware**: the question is known while the context is compressed.
  To keep memory bounded, compression still runs after every chunk: each time,
  the question is probed over the cache as it stands (``Runner.probe_work``: a
  forward of the question's tokens placed after the chunk, their KV not
  stored) and its queries score what to keep (as FINCH, Corallo & Papotti
  2024). After the context, the question is prefilled for real and a last
  compression scores with its true queries.

Policies that use no queries (KNorm, Random, StreamingLLM) and KVzip (which
scores by a re-read of each chunk) behave the same in both modes.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from longkv.engine.runner import Runner, Sequence
from longkv.errors import LongKVError

Mode = Literal["question-agnostic", "question-aware"]
MODES: tuple[str, ...] = ("question-agnostic", "question-aware")


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
        seq.probe_ids = list(question_ids)
    try:
        runner.prefill(seq, context_ids)
    finally:
        seq.probe_ids = []
    return runner.prefill(seq, question_ids)


def compress_context(runner: Runner, seq: Sequence, context_ids: list[int]) -> None:
    """Question-agnostic: prefill and compress ``context_ids`` into ``seq`` (reuse it with :func:`fork`)."""
    runner.prefill(seq, context_ids)


def fork(seq: Sequence) -> Sequence:
    """An independent copy of a sequence (its compressed cache included), to ask another question."""
    return copy.deepcopy(seq)
