"""Qwen3 forward.

The llama-family block (RMSNorm, RoPE over halves, SwiGLU, GQA) without q/k/v
biases, and with QK-norm: each query head and each key head is RMS-normalised
with a learned (head_dim,) weight before RoPE (``ModelConfig.qk_norm``; HF
``self_attn.q_norm`` / ``k_norm``, GGUF ``attn_q_norm`` / ``attn_k_norm``). Like
Qwen2, llama.cpp stores Qwen3's q/k rows unpermuted (NEOX rope mode).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from longkv.models.family import Family
from longkv.models.llama import LlamaModel
from longkv.models.qwen2 import qwen_window


class Qwen3Model(LlamaModel):
    """Qwen3 decoder: :class:`LlamaModel` with QK-norm (no biases)."""


def _hf_config(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return qwen_window(cfg, {**fields, "qk_norm": True})


def _gguf_config(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "qk_norm": True}  # always: a file without them is incomplete (the forward says which weight)


FAMILY = Family(
    model_type="qwen3",
    gguf_arch="qwen3",
    models="Qwen3 (dense)",
    features="the llama block with QK-norm, no biases",
    forward=Qwen3Model,
    hf_config=_hf_config,
    gguf_config=_gguf_config,
)
