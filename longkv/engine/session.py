"""Generation that continues an existing :class:`~longkv.engine.runner.Sequence`, and can be stopped.

A server keeps KV caches between requests: it hands the engine a sequence whose
cache already holds a prefix of the prompt (``seq.tokens == ids[:m]``), and only
``ids[m:]`` is prefilled. :func:`continue_generation` does that, then decodes,
yielding text as :meth:`LLM.stream` does.

Stopping: a :class:`StoppableRunner` asks ``should_stop()`` before every layer's
attention, so a client that goes away stops the work within one layer of one
forward (a few milliseconds), not at the end of a 512-token chunk. The forward
cut short raises :class:`Cancelled`; layers before the cut may hold KV for
tokens that are not in ``seq.tokens``, so :func:`rollback` truncates them
(``seq.tokens`` is only extended once a forward has finished).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from longkv.config import EngineConfig
from longkv.engine.llm import LLM, _find_stop, _held_back
from longkv.engine.runner import Runner, Sequence
from longkv.engine.sampling import SamplingParams, make_generator, sample
from longkv.models.llama import LlamaModel
from longkv.policies.base import KVPolicy


class Cancelled(Exception):
    """The caller asked the generation to stop (e.g. the HTTP client disconnected)."""


class StoppableRunner(Runner):
    """A :class:`Runner` that raises :class:`Cancelled` before any layer once ``should_stop()`` is true."""

    def __init__(self, model: LlamaModel, policy: KVPolicy, engine: EngineConfig, should_stop: Callable[[], bool]) -> None:
        super().__init__(model, policy, engine)
        self.should_stop = should_stop

    def _attention(self, seq: Sequence):  # type: ignore[no-untyped-def]
        inner = super()._attention(seq)
        should_stop = self.should_stop

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            if should_stop():
                raise Cancelled
            return inner(layer, q, k, v, pos)

        return attention


def rollback(seq: Sequence) -> None:
    """After a :class:`Cancelled` forward: drop KV of tokens not in ``seq.tokens`` (valid for caches that evict nothing)."""
    seq.cache.truncate(len(seq.tokens))


@dataclass
class Turn:
    """What one continued generation did, filled in as it runs.

    Attributes:
        prompt_tokens: length of ``ids``.
        reused_tokens: prompt tokens whose KV was already in the sequence (not prefilled).
        token_ids: generated tokens (an end-of-sequence token is not included).
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"``, or ``"cancelled"``.
        pending_token: the last token sampled but not fed to the model (the EOS, or the
            final token): :func:`feed_pending` appends it so a cached sequence covers it.
        prompt_logits: (V,) float32 logits after the whole prompt (``None`` until prefilled).
        prefill_s, ttft_s, decode_s: seconds (TTFT counted from ``t0``).
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    pending_token: int | None = None
    prompt_logits: torch.Tensor | None = None
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens that were actually computed."""
        return self.prompt_tokens - self.reused_tokens


def continue_generation(
    llm: LLM,
    runner: Runner,
    seq: Sequence,
    ids: list[int],
    params: SamplingParams,
    turn: Turn,
    logits: torch.Tensor | None = None,
    t0: float | None = None,
) -> Iterator[str]:
    """Prefill what ``seq`` lacks of ``ids``, then decode; yield text pieces.

    Args:
        llm: the loaded model (tokenizer, EOS ids).
        runner: runs ``llm.model`` under the request's policy (a :class:`StoppableRunner` to cancel).
        seq: holds KV for ``ids[:len(seq.tokens)]`` (``seq.tokens`` must be that prefix).
        ids: the whole prompt, token ids.
        params: sampling and stopping.
        turn: filled as it goes (see :class:`Turn`).
        logits: (V,) logits after all of ``ids`` when ``seq`` already holds all of them.
        t0: ``time.perf_counter()`` at which the request arrived (TTFT origin).

    Raises:
        Cancelled: from a :class:`StoppableRunner` (``turn.finish_reason`` is then ``"cancelled"``).
    """
    t0 = time.perf_counter() if t0 is None else t0
    m = len(seq.tokens)
    assert seq.tokens == ids[:m], "the sequence must hold a prefix of the prompt"
    assert m < len(ids) or logits is not None, "a fully cached prompt needs its logits"
    turn.prompt_tokens, turn.reused_tokens = len(ids), m
    turn.finish_reason = "cancelled"  # until it ends otherwise
    t_pre = time.perf_counter()
    if m < len(ids):
        logits = runner.prefill(seq, ids[m:])
    assert logits is not None
    turn.prompt_logits = logits
    turn.prefill_s = time.perf_counter() - t_pre
    gen = make_generator(params.seed)
    out, emitted, t_first = turn.token_ids, "", 0.0
    for step in range(params.max_new_tokens):
        token = sample(logits, params, gen)
        if step == 0:
            t_first = time.perf_counter()
            turn.ttft_s = t_first - t0
        turn.pending_token = token
        if token in llm.eos_ids and not params.ignore_eos:
            turn.finish_reason = "stop"
            break
        out.append(token)
        text = llm.tokenizer.decode(out, skip_special_tokens=True)
        cut = _find_stop(text, params.stop)
        if cut is not None:
            if cut > len(emitted):
                yield text[len(emitted) : cut]
            turn.finish_reason = "stop"
            break
        safe = len(text) - _held_back(text, params.stop)  # a partial stop string or UTF-8 character waits
        if safe > len(emitted):
            yield text[len(emitted) : safe]
            emitted = text[:safe]
        if step + 1 == params.max_new_tokens:
            if len(text) > len(emitted):
                yield text[len(emitted) :]
            turn.finish_reason = "length"
            break
        logits = runner.decode(seq, token)
        turn.pending_token = None
    else:
        turn.finish_reason = "length"  # max_new_tokens == 0
    if t_first:
        turn.decode_s = time.perf_counter() - t_first


def feed_pending(runner: Runner, seq: Sequence, turn: Turn) -> None:
    """Feed the token sampled last but never fed (EOS or the final one), so ``seq`` covers it too.

    A chat's next turn starts with this turn's prompt, its answer and the end-of-turn
    token: with it in the cache, the next turn reuses all of them. Costs one decode step.
    """
    if turn.pending_token is not None:
        runner.decode(seq, turn.pending_token)
        turn.pending_token = None
