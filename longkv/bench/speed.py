"""Prefill and decode speed and KV memory against context length, ours beside the competitors.

Same prompts (real text, the model's tokenizer), same thread count, same model
file for every backend; one warm-up generation per backend first; each
(backend, policy, length) measured ``repeats`` times (the summary takes medians).
Decoding is greedy and ignores end-of-sequence so every run decodes the same
number of tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longkv.bench.competitors import kv_bytes, make_competitor
from longkv.bench.ppl import text_window
from longkv.bench.runner import Progress, keep_ratio
from longkv.errors import LongKVError

EAGER_LIMIT_BYTES = 4 * 2**30  # transformers eager attention materialises heads x T x T float32 weights per layer


def _longkv_row(llm: Any, ids: list[int], policy: str, decode_tokens: int) -> dict[str, Any]:
    out = llm.generate(ids, max_new_tokens=decode_tokens, policy=policy, ignore_eos=True)
    s = out.stats.as_dict()
    return {k: s[k] for k in ("prompt_tokens", "generated_tokens", "prefill_s", "ttft_s", "decode_s", "prefill_tok_s", "decode_tok_s", "peak_kv_bytes")}


def run_speed(
    folder: Any,
    llm: Any,
    model_path: Path,
    texts: list[str],
    policies: list[str],
    lengths: list[int],
    vs: list[str],
    repeats: int,
    decode_tokens: int,
    threads: int,
    seed: int,
    quiet: bool,
) -> int:
    """Measure every (backend, policy, length, repeat) not yet in ``folder``; returns rows written.

    Raises:
        LongKVError: a competitor that cannot run here (missing package, not a GGUF file).
    """
    done = folder.done_keys()
    cells = [("longkv", p) for p in policies] + [(c, "dense") for c in vs]
    todo = [(b, p, L, r) for b, p in cells for L in lengths for r in range(repeats) if f"{b}|{p}|speed/L{L}/r{r}" not in done]
    prompts = {L: text_window(texts, llm, L, 1, seed, 0)[:L] for L in sorted({t[2] for t in todo})}
    runners: dict[str, Any] = {}
    progress = Progress(len(todo), "speed", quiet)
    written = 0
    try:
        for b, p, L, r in todo:
            row: dict[str, Any] = {"key": f"{b}|{p}|speed/L{L}/r{r}", "task": "speed", "length": L, "policy": p, "backend": b,
                                   "threads": threads, "keep_ratio": keep_ratio(p, L)}  # fmt: skip
            ids = prompts[L]
            try:
                if b == "longkv":
                    if "longkv" not in runners:
                        llm.generate(ids[:64], max_new_tokens=4, policy="dense")  # warm-up
                        runners["longkv"] = llm
                    row |= {"status": "ok", **_longkv_row(llm, ids, p, decode_tokens)}
                else:
                    need = llm.config.n_heads * L * L * 4
                    if b == "transformers" and need > EAGER_LIMIT_BYTES:
                        raise LongKVError(f"transformers eager attention at {L} tokens needs {need / 2**30:.1f} GiB per layer for its weights: use shorter --lengths")
                    if b not in runners:
                        runners[b] = make_competitor(b, model_path, threads, max(lengths) + decode_tokens + 16)
                        runners[b].run(ids[:64], 4)  # warm-up
                    per_value = 2 if b == "llama.cpp" else 4
                    row |= {"status": "ok", **runners[b].run(ids, decode_tokens), "peak_kv_bytes": kv_bytes(llm.config, L + decode_tokens, per_value)}
            except LongKVError as exc:
                if "needs llama-cpp-python" in str(exc) or "needs a .gguf" in str(exc):
                    raise
                row |= {"status": "refused", "error": str(exc)}
            folder.append(row)
            progress.update({**row, "score": None})
            written += 1
    finally:
        progress.close()
    return written
