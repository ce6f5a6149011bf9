"""Who answers the samples: our engine, or ``transformers`` as the dense reference.

A backend turns ``(prompt text, policy spec, max new tokens, question)`` into a result
dict: ``answer`` plus timings (seconds), ``prompt_tokens`` and, for our engine,
``peak_kv_bytes``. Both read the same model reference (a GGUF file or a
Hugging Face folder), so their tokens are identical.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from longkv.errors import LongKVError

BACKENDS = ("longkv", "transformers")


def load_tokenizer(model: str | None) -> Any:
    """The model's tokenizer without loading its weights (fast for generating samples).

    Raises:
        LongKVError: the model reference cannot be resolved or has no tokenizer.
    """
    from longkv.loading import _gguf_tokenizer, resolve

    path = resolve(model)
    if path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise LongKVError(f"{path}: no usable tokenizer ({type(exc).__name__}): add tokenizer.json to the folder") from None


class LongKVBackend:
    """Our engine: :class:`~longkv.LLM`, greedy decoding, one policy per call.

    ``question_aware``: name each sample's question to the engine, as ``longkv ask``
    does: eviction policies that score with queries compress for it, and block_topk
    chooses its pages from its queries. False: the prompt is one text, question-agnostic.
    """

    name = "longkv"

    def __init__(
        self, model: str | None, dtype: str = "bfloat16", chunk_size: int = 512, threads: int | None = None, device: str = "cpu",
        weights: str = "auto", question_aware: bool = False,
    ) -> None:
        from longkv.engine.llm import LLM

        self.llm = LLM(model, dtype=dtype, chunk_size=chunk_size, threads=threads, device=device, weights=weights)
        self.tokenizer = self.llm.tokenizer
        self.question_aware = question_aware

    def window(self) -> int:
        return int(self.llm.config.max_position)

    def inputs(self, prompt: str, question: str) -> tuple[str | list[int], list[int] | None]:
        """What :meth:`generate` gives the engine: ``prompt`` alone (question-agnostic, or a sample naming
        no question), or its ids and their tail from ``question`` on (:meth:`~longkv.LLM.question_tail`:
        the question and the chat template's tail).

        Raises:
            LongKVError: ``question`` is not in ``prompt``.
        """
        if not self.question_aware or not question:
            return prompt, None
        if question not in prompt:
            raise LongKVError(f"the sample's question {question[:60]!r} is not in its prompt: regenerate the samples in a new run folder")
        return self.llm.question_tail(prompt, question)

    def question_ids(self, prompt: str, question: str) -> list[int] | None:
        """The question ids :meth:`generate` names for ``prompt`` (None: question-agnostic). Raises as :meth:`inputs`."""
        return self.inputs(prompt, question)[1]

    def generate(self, prompt: str, policy: str, max_new_tokens: int, question: str = "") -> dict[str, Any]:
        """Answer ``prompt`` under ``policy``, naming ``question`` to the engine when the run is
        question-aware. Raises LongKVError when the policy cannot serve the input or the question is not in it."""
        ids, qids = self.inputs(prompt, question)
        out = self.llm.generate(ids, max_new_tokens=max_new_tokens, policy=policy, question_ids=qids)
        s = out.stats
        return {
            "answer": out.text,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "prefill_s": round(s.prefill_s, 4),
            "ttft_s": round(s.ttft_s, 4),
            "decode_s": round(s.decode_s, 4),
            "prefill_tok_s": round(s.prefill_tok_s, 1),
            "decode_tok_s": round(s.decode_tok_s, 1),
            "peak_kv_bytes": s.peak_kv_bytes,
            "policy_resolved": s.policy,
            "weights": self.llm.decode_weights,
            "question_tokens": len(qids) if qids else 0,
        }


class TransformersBackend:
    """Hugging Face ``transformers`` eager attention, dense, greedy: the reference answers.

    Loads GGUF files through ``from_pretrained(folder, gguf_file=name)`` (needs
    ``accelerate``), float32 weights.
    """

    name = "transformers"

    def __init__(self, model: str | None, dtype: str = "float32", chunk_size: int = 512, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from longkv.loading import resolve

        if threads is not None:
            torch.set_num_threads(threads)
        path = resolve(model)
        kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": getattr(torch, dtype)}
        if path.suffix == ".gguf":
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        self.model.eval()
        self.tokenizer = load_tokenizer(str(path))
        self.torch = torch

    def window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def generate(self, prompt: str, policy: str, max_new_tokens: int, question: str = "") -> dict[str, Any]:
        """Dense greedy generation (``question`` changes nothing for dense attention).

        Raises:
            LongKVError: any policy but ``dense``, or an input beyond the window.
        """
        if policy.split(":")[0].strip().lower() != "dense":
            raise LongKVError(f"the transformers backend runs dense attention only, not {policy!r}: pass --policy dense")
        torch = self.torch
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.window() and len(ids) + max_new_tokens > self.window():
            raise LongKVError(f"input of {len(ids) + max_new_tokens} tokens exceeds the model's trained window of {self.window()}")
        x = torch.tensor([ids])
        eos = self.tokenizer.eos_token_id
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=x, use_cache=True)
            t_first = time.perf_counter()
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            new: list[int] = []
            while token != eos and len(new) < max_new_tokens:
                new.append(token)
                if len(new) == max_new_tokens:
                    break
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            t_end = time.perf_counter()
        prefill = t_first - t0
        return {
            "answer": self.tokenizer.decode(new, skip_special_tokens=True),
            "prompt_tokens": len(ids),
            "generated_tokens": len(new),
            "prefill_s": round(prefill, 4),
            "ttft_s": round(prefill, 4),
            "decode_s": round(t_end - t_first, 4),
            "prefill_tok_s": round(len(ids) / prefill, 1) if prefill > 0 else 0.0,
            "decode_tok_s": round((len(new) - 1) / (t_end - t_first), 1) if len(new) > 1 and t_end > t_first else 0.0,
            "peak_kv_bytes": None,
            "policy_resolved": "dense (transformers eager)",
        }


def make_backend(
    name: str, model: str | None, dtype: str | None = None, chunk_size: int = 512, threads: int | None = None, device: str = "cpu",
    weights: str = "auto", question_aware: bool = False,
) -> Any:
    """Build a backend by name (``device``, ``weights``, ``question_aware``: longkv's; the transformers
    reference runs on the CPU, dense).

    Raises:
        LongKVError: unknown backend name, or the transformers backend off the CPU.
    """
    if name == "longkv":
        return LongKVBackend(model, dtype or "bfloat16", chunk_size, threads, device, weights, question_aware)
    if device != "cpu":
        raise LongKVError(f"the transformers backend runs on the CPU: drop --device {device} or use --backend longkv")
    if name == "transformers":
        return TransformersBackend(model, dtype or "float32", chunk_size, threads)
    raise LongKVError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def model_label(model: str | None) -> str:
    """A short model name for tables: the file or folder name."""
    return Path(model).stem if model else "default"
