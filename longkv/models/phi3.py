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

* The 128K variants (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) use LongRoPE: each
  rotated channel pair has its own frequency divisor and q.k is scaled by an attention
  factor (:class:`~longkv.config.RopeScaling`, kind ``"longrope"``). HF configs carry
  the factors in ``rope_scaling``; llama.cpp stores them as the tensors
  ``rope_factors_long`` / ``rope_factors_short`` with ``rope.scaling.attn_factor`` and
  ``rope.scaling.original_context_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import torch

from longkv.config import ModelConfig, RopeScaling
from longkv.errors import LongKVError
from longkv.models.family import Family
from longkv.models.llama import LlamaModel


class Phi3Model(LlamaModel):
    """Phi-3 decoder: :class:`LlamaModel` over the fused projections (same arguments and errors)."""

    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none",
        weight_bits: Mapping[str, int] | None = None,
    ) -> None:
        bits = dict(weight_bits or {})
        for name, b in (weight_bits or {}).items():  # the split tensors keep their fused tensor's bits
            for fused, parts in _FUSED.items():
                if name.endswith(fused):
                    bits.update({name[: -len(fused)] + part: b for part in parts})
        super().__init__(config, split_fused(config, weights), decode_weights, bits)


_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


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
        for (fused, parts), rows in zip(_FUSED.items(), (sizes, (c.intermediate_size,) * 2), strict=True):
            w = out.pop(p + fused, None)
            if w is None:
                raise LongKVError(f"weight {p + fused} missing from the model file: the file is incomplete or not a Phi-3 model")
            if w.shape[0] != sum(rows):
                raise LongKVError(f"weight {p + fused} has {w.shape[0]} rows, the config implies {sum(rows)}: the file does not match its config")
            out.update({p + n: t for n, t in zip(parts, torch.split(w, list(rows)), strict=True)})
    return out


def _gguf_config(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE from a Phi-3 GGUF: the factor tensors, the original context and the attention factor.

    Raises:
        LongKVError: the file has the long factors but not the short ones, or the caller passed
            only tensor names (the factors' values are needed).
    """
    if "rope_factors_long.weight" not in tensors:
        return fields
    if not isinstance(tensors, Mapping) or "rope_factors_short.weight" not in tensors:
        raise LongKVError("this Phi GGUF has rope_factors_long but its short factors or their values are missing: the file is incomplete")
    long_f, short_f = (tuple(float(x) for x in np.asarray(tensors[f"rope_factors_{k}.weight"], dtype=np.float64).reshape(-1))
                       for k in ("long", "short"))
    orig = int(get("rope.scaling.original_context_length") or 4096)
    attn = get("rope.scaling.attn_factor")
    scaling = RopeScaling.longrope(long_f, short_f, fields["max_position"] / orig, orig, float(attn) if attn is not None else None)
    return {**fields, "rope_scaling": scaling}


FAMILY = Family(
    model_type="phi3",
    gguf_arch="phi3",
    models="Phi-3 / Phi-3.5 mini and medium, Phi-4-mini",
    features="fused qkv and gate/up projections, partial rotary, LongRoPE, sliding window",
    forward=Phi3Model,
    gguf_config=_gguf_config,
    gguf_config_tensors=("rope_factors_long.weight", "rope_factors_short.weight"),
    # llama.cpp's phi3 tensors: attn_qkv, and ffn_up holding gate then up
    gguf_names={"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
)
