"""Phi-3 forward (HF ``phi3``, GGUF ``phi3``): Phi-3-mini and -medium, 4K-context variants.

Source: Abdin et al., "Phi-3 Technical Report" (2024); checked against transformers'
``models/phi3/modeling_phi3.py``. The llama block (RMSNorm, RoPE over halves, SwiGLU,
GQA), stored differently:

* q, k and v in one projection (``self_attn.qkv_proj``, rows q then k then v; GGUF
  ``attn_qkv``), and gate and up in one (``mlp.gate_up_proj``, gate rows first; GGUF
  ``ffn_up``). The llama block fuses them the same way, so the weights are used as
  they are stored.
* Partial rotary (``partial_rotary_factor``, Phi-4-mini's 0.75): only the first
  ``rotary_dim`` channels of each head turn (:class:`~longkv.models.layers.Rotary`).
* The 4K models attend over a sliding window (``sliding_window`` 2047 in
  Phi-3-mini-4k), honoured through the config's per-layer specs.

The 128K variants (and Phi-3.5/Phi-4-mini) use LongRoPE, which longkv does not
implement: loading them fails with a message saying so.
"""

from __future__ import annotations

import torch

from longkv.config import ModelConfig
from longkv.errors import LongKVError
from longkv.models.llama import LlamaModel


class Phi3Model(LlamaModel):
    """Phi-3 decoder: :class:`LlamaModel` over the fused projections (same arguments and errors)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none") -> None:
        super().__init__(config, split_fused(config, weights), decode_weights)


def split_fused(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with each layer's ``qkv_proj`` / ``gate_up_proj`` as the llama block's q/k/v and gate/up
    tensors (views, no copy).

    Raises:
        LongKVError: a fused weight is missing or has the wrong number of rows.
    """
    c = config
    out = dict(weights)
    sizes = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        for fused, parts, rows in (
            ("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), sizes),
            ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), (c.intermediate_size,) * 2),
        ):
            w = out.pop(p + fused, None)
            if w is None:
                raise LongKVError(f"weight {p + fused} missing from the model file: the file is incomplete or not a Phi-3 model")
            if w.shape[0] != sum(rows):
                raise LongKVError(f"weight {p + fused} has {w.shape[0]} rows, the config implies {sum(rows)}: the file does not match its config")
            out.update({p + n: t for n, t in zip(parts, torch.split(w, list(rows)), strict=True)})
    return out
