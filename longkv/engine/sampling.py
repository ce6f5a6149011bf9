"""Sampling as pure functions: logits in, one token id out.

Greedy when ``temperature == 0``; otherwise temperature, then top-k, then
top-p (nucleus, Holtzman et al. 2020), then min-p filtering, then a draw from a seeded
``torch.Generator`` so a seed reproduces a completion exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longkv.config import ASK_DRY_MULTIPLIER
from longkv.errors import LongKVError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    Attributes:
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set whose probability reaches p (1.0: all).
        min_p: keep the tokens at least ``min_p`` times as likely as the most likely one
            (after temperature, top-k and top-p; 0.0: all).
        seed: seed of the sampling generator (None: nondeterministic).
        stop: strings that end the completion (not included in the text).
        ignore_eos: keep going past end-of-sequence tokens (benchmarks).
        repetition_penalty: > 1 makes tokens already generated less likely (CTRL,
            Keskar et al. 2019: positive logits divided by it, negative ones
            multiplied); 1.0: off.
        dry_multiplier: the loop guard (DRY, "don't repeat yourself", as in llama.cpp's
            sampler): a token that would extend a run of ``n >= dry_allowed_length`` tokens
            already generated earlier in the same order loses
            ``dry_multiplier * dry_base ** (n - dry_allowed_length)`` from its logit.
            Only the generated tokens count, so quoting the prompt is free, and a short
            repeat costs little (0.8 at 2 tokens, 1.4 at 3, 7.5 at 6 with the defaults of
            ``ask``): a confident copy such as ``3391117`` goes through, a loop does not. 0.0: off.
        dry_base, dry_allowed_length: the guard's growth per repeated token, and the
            longest repeat it lets through.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    min_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "dry_allowed_length"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int):
                raise LongKVError(f"{name} must be a whole number, got {x!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "dry_multiplier", "dry_base"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
                raise LongKVError(f"{name} must be a number, got {x!r}")
        if self.max_new_tokens < 0:
            raise LongKVError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}: pass 0 or more tokens")
        if self.temperature < 0:
            raise LongKVError(f"temperature must be >= 0, got {self.temperature}: use 0 for greedy")
        if self.top_k < 0:
            raise LongKVError(f"top_k must be >= 0, got {self.top_k}: use 0 to disable")
        if not self.repetition_penalty > 0:
            raise LongKVError(f"repetition_penalty must be > 0, got {self.repetition_penalty}: use 1.0 to disable")
        if not self.dry_multiplier >= 0:
            raise LongKVError(f"dry_multiplier must be >= 0, got {self.dry_multiplier}: use 0 to turn the loop guard off ({ASK_DRY_MULTIPLIER} is the default of ask)")
        if not self.dry_base > 1:
            raise LongKVError(f"dry_base must be > 1, got {self.dry_base}: e.g. 1.75")
        if self.dry_allowed_length < 1:
            raise LongKVError(f"dry_allowed_length must be >= 1, got {self.dry_allowed_length}: e.g. 2")
        if not 0.0 < self.top_p <= 1.0:
            raise LongKVError(f"top_p must be in (0, 1], got {self.top_p}: use 1.0 to disable, e.g. 0.9 to keep the top 90 % of the mass")
        if not 0.0 <= self.min_p <= 1.0:
            raise LongKVError(f"min_p must be in [0, 1], got {self.min_p}: use 0 to disable, e.g. 0.05")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from entropy when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set filtered-out entries of logits (V,) to -inf (top-k, then top-p, then min-p). Returns a new tensor."""
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
    if min_p > 0.0:  # p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p)
        out[out < out.max() + math.log(min_p)] = float("-inf")
    return out


def penalize_repeats(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """Logits (V,) with every token of ``history`` made less likely by ``penalty`` (a new tensor)."""
    if penalty == 1.0 or not history:
        return logits
    out = logits.clone()
    idx = torch.tensor(sorted(set(history)), dtype=torch.int64, device=logits.device)
    seen = out[idx]
    out[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


DRY_LOOKBACK = 512  # generated tokens the loop guard searches
DRY_MAX_RUN = 64  # repeats longer than this are penalised as this long


def repeat_runs(history: list[int], allowed: int) -> dict[int, int]:
    """Tokens that would extend a repeat: token id -> length of the longest run of the newest
    tokens of ``history`` that, earlier in ``history``, was followed by that token
    (only runs of at least ``allowed`` tokens; the last :data:`DRY_LOOKBACK` tokens searched)."""
    h = history[-DRY_LOOKBACK:]
    n_h = len(h)
    if n_h <= allowed:
        return {}
    last = h[-1]
    runs: dict[int, int] = {}
    for j in range(n_h - 1):  # h[j + 1] followed an earlier occurrence of the newest token
        if h[j] != last:
            continue
        n = 1
        while n < DRY_MAX_RUN and j - n >= 0 and h[j - n] == h[n_h - 1 - n]:
            n += 1
        if n >= allowed:
            t = h[j + 1]
            runs[t] = max(runs.get(t, 0), n)
    return runs


def penalize_loops(logits: torch.Tensor, history: list[int], params: SamplingParams) -> torch.Tensor:
    """Logits (V,) with the DRY loop guard applied (see :class:`SamplingParams`; a new tensor, or ``logits`` when off)."""
    if params.dry_multiplier == 0.0:
        return logits
    runs = repeat_runs(history, params.dry_allowed_length)
    if not runs:
        return logits
    out = logits.clone()
    for t, n in runs.items():
        out[t] -= params.dry_multiplier * params.dry_base ** (n - params.dry_allowed_length)
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, history: list[int] | None = None) -> int:
    """Pick one token id from logits (V,) float32; ``history``: tokens generated so far (repetition penalty, loop guard)."""
    logits = penalize_repeats(logits, history or [], params.repetition_penalty)
    logits = penalize_loops(logits, history or [], params)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(scaled, dim=-1).cpu()  # drawn with the CPU generator: a seed samples alike on every device
    return int(torch.multinomial(probs, 1, generator=generator))
