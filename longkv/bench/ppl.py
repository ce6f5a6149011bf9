"""Perplexity of long text under a KV policy, evaluated token by token (streaming evaluation).

As StreamingLLM (Xiao et al. 2023) reports it: a prefix of ``length`` tokens is
prefilled in chunks under the policy, then each of the next ``eval_tokens``
tokens is scored from the logits of the step before and fed with one decode
step, so every scored token sees exactly the cache the policy kept, as it would
in generation. ``ppl = exp(mean negative log-likelihood)`` over the scored tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from longkv.bench.tasks import sample_rng
from longkv.errors import LongKVError


@dataclass
class PplResult:
    """Mean NLL (nats/token), perplexity, tokens scored, and costs (seconds, bytes)."""

    nll: float
    ppl: float
    eval_tokens: int
    prefill_s: float
    eval_s: float
    peak_kv_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "nll": round(self.nll, 5), "ppl": round(self.ppl, 4), "eval_tokens": self.eval_tokens,
            "prefill_s": round(self.prefill_s, 3), "eval_s": round(self.eval_s, 3), "peak_kv_bytes": self.peak_kv_bytes,
            "decode_tok_s": round(self.eval_tokens / self.eval_s, 2) if self.eval_s > 0 else 0.0,
        }  # fmt: skip


@torch.inference_mode()
def streaming_nll(llm: Any, ids: list[int], prefix: int, policy: str) -> PplResult:
    """Score ``ids[prefix:]`` one token at a time after prefilling ``ids[:prefix]`` under ``policy``.

    Args:
        llm: a loaded :class:`~longkv.LLM`.
        ids: token ids, ``len(ids) > prefix >= 1``.
        prefix: tokens prefilled before the first scored one.
        policy: a policy spec such as ``streaming:budget=1024``.

    Raises:
        LongKVError: the policy cannot serve ``len(ids)`` tokens (e.g. dense beyond the trained window).
    """
    from longkv.engine.runner import Runner

    assert 1 <= prefix < len(ids)
    pol = llm.resolve_policy(len(ids), policy)
    runner = Runner(llm.model, pol, llm.engine_config)
    seq = runner.new_sequence(len(ids))
    t0 = time.perf_counter()
    logits = runner.prefill(seq, ids[:prefix])
    t1 = time.perf_counter()
    total = 0.0
    targets = ids[prefix:]
    for i, tok in enumerate(targets):
        total -= float(torch.log_softmax(logits.float(), dim=-1)[tok])
        if i + 1 < len(targets):
            logits = runner.decode(seq, tok)
    t2 = time.perf_counter()
    nll = total / len(targets)
    return PplResult(nll, math.exp(nll), len(targets), t1 - t0, t2 - t1, max(seq.peak_kv_bytes, seq.cache.bytes()))


def text_window(texts: list[str], llm: Any, length: int, eval_tokens: int, seed: int, index: int) -> list[int]:
    """``length + eval_tokens`` consecutive tokens of one haystack text, from a seeded paragraph start.

    Raises:
        LongKVError: no text long enough.
    """
    need = length + eval_tokens
    rng = sample_rng(seed, f"ppl/L{length}/E{eval_tokens}/s{index}")
    long_enough = [t for t in texts if len(t) > need * 6]
    if not long_enough:
        raise LongKVError(f"no haystack text holds {need} tokens: pass a longer --haystack file or shorter --lengths")
    text = long_enough[rng.randrange(len(long_enough))]
    start = rng.randrange(max(1, len(text) - need * 6))
    para = text.find("\n\n", start)
    start = para + 2 if 0 <= para < len(text) - need * 6 else 0
    ids = llm.encode(text[start : start + need * 6])
    if len(ids) < need:
        raise LongKVError(f"the haystack text yields under {need} tokens: pass a longer --haystack file")
    return ids[:need]


def run_ppl(folder: Any, llm: Any, texts: list[str], policies: list[str], lengths: list[int], eval_tokens: int, samples: int, seed: int, quiet: bool) -> int:
    """Every (policy, length, sample) not yet in ``folder``'s results: one row each; returns rows written."""
    from longkv.bench.runner import Progress, keep_ratio

    done = folder.done_keys()
    todo = [(p, L, i) for p in policies for L in lengths for i in range(samples) if f"{p}|ppl/L{L}/E{eval_tokens}/s{i}" not in done]
    progress = Progress(len(todo), "ppl", quiet)
    try:
        for p, L, i in todo:
            sid = f"ppl/L{L}/E{eval_tokens}/s{i}"
            row: dict[str, Any] = {"key": f"{p}|{sid}", "task": "ppl", "sample_id": sid, "length": L, "policy": p, "backend": "longkv",
                                   "keep_ratio": keep_ratio(p, L)}  # fmt: skip
            try:
                ids = text_window(texts, llm, L, eval_tokens, seed, i)
                row |= {"status": "ok", **streaming_nll(llm, ids, L, p).as_dict()}
            except LongKVError as exc:
                if "haystack" in str(exc):
                    raise
                row |= {"status": "refused", "error": str(exc)}
            folder.append(row)
            progress.update({**row, "score": None})
    finally:
        progress.close()
    return len(todo)
