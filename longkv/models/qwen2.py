"""Qwen2 / Qwen2.5 forward.

Same block as the llama family (RMSNorm, RoPE over halves, SwiGLU, GQA) with
biases on the q, k and v projections (``ModelConfig.attention_bias``: always for
``model_type == "qwen2"``; read off the tensors in GGUF files). llama.cpp stores
Qwen2's q/k rows unpermuted (it uses its NEOX rope mode), so loading applies no
reordering.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from longkv.models.family import Family
from longkv.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    """Qwen2 decoder: :class:`LlamaModel` whose q/k/v projections carry biases."""


def qwen_window(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Qwen configs carry a ``sliding_window`` they do not use unless ``use_sliding_window`` is set."""
    if not cfg.get("use_sliding_window", False):
        fields.update(sliding_window=None, layers=())
    return fields


def _hf_config(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return qwen_window(cfg, {**fields, "attention_bias": True})


def _gguf_config(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "attention_bias": True}  # always: a file without them is incomplete (the forward says which weight)


FAMILY = Family(
    model_type="qwen2",
    gguf_arch="qwen2",
    models="Qwen2 / Qwen2.5, Qwen2.5-Coder",
    features="the llama block with q/k/v biases",
    forward=Qwen2Model,
    hf_config=_hf_config,
    gguf_config=_gguf_config,
)
