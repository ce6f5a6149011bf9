"""Qwen2 / Qwen2.5 forward.

Same block as the llama family (RMSNorm, RoPE over halves, SwiGLU, GQA) with
biases on the q, k and v projections (``ModelConfig.attention_bias``, which
:meth:`ModelConfig.from_hf_config` sets for ``model_type == "qwen2"`` and
:meth:`ModelConfig.from_gguf` reads off the tensors). llama.cpp stores Qwen2's
q/k rows unpermuted (it uses its NEOX rope mode), so loading applies no reordering.
"""

from __future__ import annotations

from longkv.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    """Qwen2 decoder: :class:`LlamaModel` whose q/k/v projections carry biases."""
