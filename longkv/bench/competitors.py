"""Prefill and decode speed of the competitors, same model file, same thread count, same prompts.

* ``llama.cpp`` through ``llama_cpp.Llama`` (llama-cpp-python), reading the same GGUF;
  its KV cache is float16 at the context size.
* ``transformers`` eager attention, float32, the GGUF loaded by
  ``from_pretrained(folder, gguf_file=name)``.

Each returns a dict with ``prefill_s``, ``prefill_tok_s``, ``ttft_s``,
``decode_s``, ``decode_tok_s`` (greedy, ``decode_tokens`` steps after the first
token) and ``peak_kv_bytes``: the size of its KV cache at that length (not
measured: computed from the model's shape).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from longkv.errors import LongKVError

COMPETITORS = ("llama.cpp", "transformers")


def kv_bytes(config: Any, tokens: int, bytes_per_value: int) -> int:
    """Bytes of a dense KV cache of ``tokens`` tokens: layers x 2 (K, V) x KV heads x head_dim."""
    return tokens * config.n_layers * 2 * config.n_kv_heads * config.head_dim * bytes_per_value


def _rates(n_prompt: int, prefill_s: float, n_new: int, decode_s: float) -> dict[str, Any]:
    return {
        "prompt_tokens": n_prompt, "generated_tokens": n_new, "prefill_s": round(prefill_s, 4), "ttft_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4), "prefill_tok_s": round(n_prompt / prefill_s, 1) if prefill_s > 0 else 0.0,
        "decode_tok_s": round((n_new - 1) / decode_s, 1) if n_new > 1 and decode_s > 0 else 0.0,
    }  # fmt: skip


class LlamaCpp:
    """llama.cpp on the same GGUF. Raises LongKVError when llama-cpp-python is missing or the model is not a GGUF."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, max_tokens: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LongKVError("--vs llama.cpp needs llama-cpp-python: pip install 'longkv[bench]'") from None
        if path.suffix != ".gguf":
            raise LongKVError(f"--vs llama.cpp needs a .gguf model, not {path}: pass --model FILE.gguf")
        self.llm = Llama(model_path=str(path), n_ctx=max_tokens, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, ids: list[int], decode_tokens: int) -> dict[str, Any]:
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()

        def greedy() -> int:
            # Llama.eval no longer copies logits out (logits_all=False): read the last row from the context.
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = greedy()
        t1 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval([tok])
            tok = greedy()
        t2 = time.perf_counter()
        return _rates(len(ids), t1 - t0, decode_tokens, t2 - t1)


class Transformers:
    """transformers eager attention, float32, on the same model file."""

    name = "transformers"

    def __init__(self, path: Path, threads: int, max_tokens: int) -> None:
        from longkv.bench.backends import TransformersBackend

        self.backend = TransformersBackend(str(path), "float32", threads=threads)

    def run(self, ids: list[int], decode_tokens: int) -> dict[str, Any]:
        torch = self.backend.torch
        model = self.backend.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(decode_tokens - 1):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
        return _rates(len(ids), t1 - t0, decode_tokens, t2 - t1)


def make_competitor(name: str, path: Path, threads: int, max_tokens: int) -> Any:
    """Build a competitor by name. Raises LongKVError for an unknown name."""
    if name == "llama.cpp":
        return LlamaCpp(path, threads, max_tokens)
    if name == "transformers":
        return Transformers(path, threads, max_tokens)
    raise LongKVError(f"unknown competitor {name!r}: choose {' or '.join(COMPETITORS)}")
