"""Sampling as pure functions: logits in, one token id out.

Greedy when ``temperature == 0``; otherwise temperature, then top-k, then
top-p (nucleus, Holtzman et al. 2020) filtering, then a draw from a seeded
``torch.Generator`` so a seed reproduces a completion exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkv.errors import LongKVError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    Attributes:
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set whose probability reaches p (1.0: all).
        seed: seed of the sampling generator (None: nondeterministic).
        stop: strings that end the completion (not included in the text).
        ignore_eos: keep going past end-of-sequence tokens (benchmarks).
        repetition_penalty: > 1 makes tokens already generated less likely (CTRL,
            Keskar et al. 2019: positive logits divided by it, negative ones
            multiplied); 1.0: off.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LongKVError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}: pass 0 or more tokens")
        if self.temperature < 0:
            raise LongKVError(f"temperature must be >= 0, got {self.temperature}: use 0 for greedy")
        if self.top_k < 0:
            raise LongKVError(f"top_k must be >= 0, got {self.top_k}: use 0 to disable")
        if not self.repetition_penalty > 0:
            raise LongKVError(f"repetition_penalty must be > 0, got {self.repetition_penalty}: use 1.0 to disable")
        if not 0.0 < self.top_p <= 1.0:
            raise LongKVError(f"top_p must be in (0, 1], got {self.top_p}: use 1.0 to disable, e.g. 0.9 to keep the top 90 % of the mass")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from entropy when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set filtered-out entries of logits (V,) to -inf (top-k, then top-p). Returns a new tensor."""
    out = logits.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[0] = False  # a top_p below float32's smallest number would otherwise drop every token
        out[order[drop]] = float("-inf")
    return out


def penalize_repeats(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """Logits (V,) with every token of ``history`` made less likely by ``penalty`` (a new tensor)."""
    if penalty == 1.0 or not history:
        return logits
    out = logits.clone()
    idx = torch.tensor(sorted(set(history)), dtype=torch.int64)
    seen = out[idx]
    out[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, history: list[int] | None = None) -> int:
    """Pick one token id from logits (V,) float32; ``history``: tokens generated so far (repetition penalty)."""
    logits = penalize_repeats(logits, history or [], params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
