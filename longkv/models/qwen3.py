"""Qwen3 forward.

The llama-family block (RMSNorm, RoPE over halves, SwiGLU, GQA) without q/k/v
biases, and with QK-norm: each query head and each key head is RMS-normalised
with a learned (head_dim,) weight before RoPE (``ModelConfig.qk_norm``; HF
``self_attn.q_norm`` / ``k_norm``, GGUF ``attn_q_norm`` / ``attn_k_norm``). Like
Qwen2, llama.cpp stores Qwen3's q/k rows unpermuted (NEOX rope mode).
"""

from __future__ import annotations

from longkv.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    """Qwen3 decoder: :class:`LlamaModel` with QK-norm (no biases)."""
