"""Gemma 3 text forward (HF ``gemma3_text``, GGUF ``gemma3``): 270M, 1B, and the text stack of 4B-27B.

Source: Gemma Team, "Gemma 3 Technical Report" (2025); every detail below checked
against transformers' ``models/gemma3/modeling_gemma3.py``. What differs from the
llama block (:mod:`longkv.models.llama`):

* Attention pattern: five sliding-window layers, then one global layer (window 512
  tokens in 270M/1B, 1024 from 4B up). Sliding layers use RoPE base 10 K, global
  layers 1 M (linear scaling x8 from 4B up). All of it lives in the config's
  per-layer :class:`~longkv.config.AttnSpec` (``ModelConfig.layers``); the engine
  honours each layer's window, the model only picks the layer's RoPE.
* Four RMSNorms per block ("sandwich"): before attention, on the attention output
  before the residual add, before the MLP, on the MLP output before the add.
* HF stores every RMSNorm weight as an offset (``x * (1 + w)``); loading adds the 1
  (llama.cpp's converter already did for GGUF files), so here every norm is a plain
  ``x / rms(x) * w``. Norm weights stay float32 and norms are computed in float32,
  as transformers does, whatever the compute dtype.
* QK-norm: each query and key head is RMS-normalised (one (head_dim,) weight each)
  before RoPE, as in Qwen3.
* GeGLU MLP (tanh-approximated GELU); embeddings multiplied by ``sqrt(hidden)``
  rounded to the compute dtype (as transformers does); LM head tied to the embeddings.
* Attention scale ``query_pre_attn_scalar ** -0.5`` (``ModelConfig.attn_scale``): equal to
  ``head_dim ** -0.5`` for 270M-12B (256 and 256), not for 27B (168 and 128). The engine's
  attention multiplies by ``head_dim ** -0.5``, so the ratio is folded into the queries
  (KV policies that score with queries then see the model's real logits too).
* Final logit softcapping ``c * tanh(logits / c)`` when the config sets it (none in Gemma 3).

llama.cpp stores Gemma's q/k rows unpermuted (NEOX rope mode), like Qwen2's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from longkv.config import ModelConfig
from longkv.errors import LongKVError
from longkv.models.layers import Linear, Rotary, gated_mlp, gelu_tanh, layer_ropes
from longkv.models.llama import AttentionFn, LlamaModel, _Layer


def norm32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (``weight``: float32, the 1 of Gemma's offset included), back in x's dtype.

    x: (..., n); weight: (n,).
    """
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


class _GemmaLayer(_Layer):
    """One Gemma 3 block's weights; ``qkv``, ``o``, ``gate_up``, ``down`` as in the llama block."""

    __slots__ = ("post_attn_norm", "post_mlp_norm")
    q_norm: torch.Tensor  # always present (the llama block's are optional)
    k_norm: torch.Tensor

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, decode: str) -> None:
        def get(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in w:
                raise LongKVError(f"weight {key} missing from the model file: the file is incomplete or not a Gemma 3 model")
            return w[key]

        self.attn_norm = get("input_layernorm.weight").float()
        self.post_attn_norm = get("post_attention_layernorm.weight").float()
        self.mlp_norm = get("pre_feedforward_layernorm.weight").float()
        self.post_mlp_norm = get("post_feedforward_layernorm.weight").float()
        self.q_norm = get("self_attn.q_norm.weight").float()
        self.k_norm = get("self_attn.k_norm.weight").float()
        self.qkv = Linear(torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0), None, decode)
        self.o = Linear(get("self_attn.o_proj.weight"), None, decode)
        self.gate_up = Linear(torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")], dim=0), None, decode)
        self.down = Linear(get("mlp.down_proj.weight"), None, decode)


class Gemma3Model(LlamaModel):
    """Gemma 3 decoder, with :class:`LlamaModel`'s contract and attributes (``layers``, ``ropes``,
    ``embed``, ``lm_head``, ``decode_weights``, ``device``, ``dtype``).

    Args:
        config: model shape (``arch`` gemma3_text or gemma3).
        weights: HF-named tensors in the compute dtype, norm weights with Gemma's 1 added
            (as :func:`longkv.loading.load` returns them), preferably float32.
        decode_weights: ``"int8"`` / ``"int4"`` copies of the matrices for decode steps, or ``"none"``.

    Raises:
        LongKVError: a weight is missing.
        ValueError: int8/int4 decode weights off the CPU.
    """

    layers: Sequence[_GemmaLayer]

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none") -> None:
        self.config = config
        for key in ("model.embed_tokens.weight", "model.norm.weight"):
            if key not in weights:
                raise LongKVError(f"weight {key} missing from the model file: the file is incomplete")
        self.embed = weights["model.embed_tokens.weight"]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.layers = [_GemmaLayer(weights, f"model.layers.{i}.", decode_weights) for i in range(config.n_layers)]
        self.norm = weights["model.norm.weight"].float()
        head = self.embed if config.tie_embeddings else weights.get("lm_head.weight", self.embed)
        self.lm_head = Linear(head, None, "int8" if decode_weights == "int4" else decode_weights)  # see LlamaModel
        self.decode_weights = decode_weights
        self.ropes = layer_ropes(config, self.device)  # sliding layers: base 10 K; global: 1 M (+ linear scaling)
        c = config
        self._split = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
        # sqrt(hidden) rounded to the compute dtype first, as transformers does (bf16: sqrt(640) = 25.30 -> 25.25)
        self.embed_scale = torch.tensor(c.hidden_size**0.5, dtype=self.dtype, device=self.device)
        # query_pre_attn_scalar ** -0.5 instead of the attention's head_dim ** -0.5: folded into q (None: equal)
        q_scale = (c.attn_scale if c.attn_scale is not None else c.head_dim**-0.5) * math.sqrt(c.head_dim)
        self.q_scale = None if math.isclose(q_scale, 1.0, rel_tol=1e-9) else q_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_at: Literal["last", "all", "none"] | torch.Tensor = "last",
    ) -> torch.Tensor | None:
        """Run the decoder over T new tokens; arguments and result as :meth:`LlamaModel.forward`."""
        c = self.config
        T, H, eps = input_ids.shape[0], c.n_heads, c.rms_eps
        x = F.embedding(input_ids, self.embed) * self.embed_scale  # (T, hidden)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rope) -> cos, sin (T, D/2): once per distinct RoPE
        nq, nk, _ = self._split
        for i, L in enumerate(self.layers):
            rope = self.ropes[i]  # this layer's RoPE: the sliding or the global one
            if id(rope) not in tables:
                tables[id(rope)] = rope.cos_sin(positions, self.dtype)
            cos, sin = tables[id(rope)]
            qkv = L.qkv(norm32(x, L.attn_norm, eps))  # (T, (H + 2 Hkv) D)
            qk = qkv[:, : nq + nk].view(T, -1, c.head_dim)  # (T, H + Hkv, D)
            qk = torch.cat((norm32(qk[:, :H], L.q_norm, eps), norm32(qk[:, H:], L.k_norm, eps)), dim=1)
            qk = Rotary.apply(qk.transpose(0, 1), cos, sin)  # (H + Hkv, T, D)
            q, k = qk[:H], qk[H:]  # (H, T, D), (Hkv, T, D)
            if self.q_scale is not None:
                q = q * self.q_scale
            v = qkv[:, nq + nk :].view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)
            o = attention(i, q, k, v, positions)  # (H, T, D)
            x = x + norm32(L.o(o.transpose(0, 1).reshape(T, nq)), L.post_attn_norm, eps)
            h = gated_mlp(norm32(x, L.mlp_norm, eps), L.gate_up, L.down, gelu_tanh)
            x = x + norm32(h, L.post_mlp_norm, eps)
        if isinstance(logits_at, torch.Tensor):
            x = x[logits_at]
        elif logits_at == "none":
            return None
        elif logits_at == "last":
            x = x[-1:]
        logits = self.lm_head(norm32(x, self.norm, eps)).float()
        if c.final_softcap is not None:
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        return logits
