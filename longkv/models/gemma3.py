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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from longkv import kernels
from longkv.config import AttnSpec, ModelConfig, RopeScaling
from longkv.errors import LongKVError
from longkv.models.family import Family, Source
from longkv.models.layers import Linear, Rotary, gated_mlp, gelu_tanh, layer_ropes
from longkv.models.llama import AttentionFn, LlamaModel, _Layer, head_decode


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

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, decode: str, weight_bits: Mapping[str, int] | None = None) -> None:
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
        self._matrices(get, prefix, False, decode, weight_bits or {})


class Gemma3Model(LlamaModel):
    """Gemma 3 decoder, with :class:`LlamaModel`'s contract and attributes (``layers``, ``ropes``,
    ``embed``, ``lm_head``, ``decode_weights``, ``device``, ``dtype``).

    Args:
        config: model shape (``arch`` gemma3_text).
        weights: HF-named tensors in the compute dtype, norm weights with Gemma's 1 added
            (as :func:`longkv.loading.load` returns them), preferably float32.
        decode_weights: ``"int8"`` / ``"int4"`` copies of the matrices for decode steps, or ``"none"``.

    Raises:
        LongKVError: a weight is missing.
        ValueError: int8/int4 decode weights off the CPU.
    """

    layers: Sequence[_GemmaLayer]

    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none",
        weight_bits: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        for key in ("model.embed_tokens.weight", "model.norm.weight"):
            if key not in weights:
                raise LongKVError(f"weight {key} missing from the model file: the file is incomplete")
        self.embed = weights["model.embed_tokens.weight"]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.layers = [_GemmaLayer(weights, f"model.layers.{i}.", decode_weights, weight_bits) for i in range(config.n_layers)]
        self.norm = weights["model.norm.weight"].float()
        head = self.embed if config.tie_embeddings else weights.get("lm_head.weight", self.embed)
        self.lm_head = Linear(head, None, head_decode(decode_weights))
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
        coded: bool | None = None,
    ) -> torch.Tensor | None:
        """Run the decoder over T new tokens; arguments and result as :meth:`LlamaModel.forward`."""
        c = self.config
        T, H, eps = input_ids.shape[0], c.n_heads, c.rms_eps
        x = F.embedding(input_ids, self.embed) * self.embed_scale  # (T, hidden)
        if coded is None:
            coded = Linear.decode_max_rows >= T
        if kernels.fused_ok(x) and c.head_dim <= kernels.MAX_HEAD_DIM:
            return self._forward_fused(x, positions, attention, logits_at, coded)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rope) -> cos, sin (T, D/2): once per distinct RoPE
        nq, nk, _ = self._split
        for i, L in enumerate(self.layers):
            rope = self.ropes[i]  # this layer's RoPE: the sliding or the global one
            if id(rope) not in tables:
                tables[id(rope)] = rope.cos_sin(positions, self.dtype)
            cos, sin = tables[id(rope)]
            qkv = L.qkv(norm32(x, L.attn_norm, eps), coded)  # (T, (H + 2 Hkv) D)
            qk = qkv[:, : nq + nk].view(T, -1, c.head_dim)  # (T, H + Hkv, D)
            qk = torch.cat((norm32(qk[:, :H], L.q_norm, eps), norm32(qk[:, H:], L.k_norm, eps)), dim=1)
            qk = Rotary.apply(qk.transpose(0, 1), cos, sin)  # (H + Hkv, T, D)
            q, k = qk[:H], qk[H:]  # (H, T, D), (Hkv, T, D)
            if self.q_scale is not None:
                q = q * self.q_scale
            v = qkv[:, nq + nk :].view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)
            o = attention(i, q, k, v, positions)  # (H, T, D)
            x = x + norm32(L.o(o.transpose(0, 1).reshape(T, nq), coded), L.post_attn_norm, eps)
            h = gated_mlp(norm32(x, L.mlp_norm, eps), L.gate_up, L.down, gelu_tanh, coded)
            x = x + norm32(h, L.post_mlp_norm, eps)
        if isinstance(logits_at, torch.Tensor):
            x = x[logits_at]
        elif logits_at == "none":
            return None
        elif logits_at == "last":
            x = x[-1:]
        return self._head(norm32(x, self.norm, eps), coded)

    def _head(self, h: torch.Tensor, coded: bool) -> torch.Tensor:
        """Logits (R, vocab) float32 of the final-normed rows ``h`` (R, hidden), softcapped if the config says so."""
        logits = self.lm_head(h, coded).float()
        c = self.config
        if c.final_softcap is not None:
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        return logits

    def _forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionFn, logits_at: Literal["last", "all", "none"] | torch.Tensor,
        coded: bool,
    ) -> torch.Tensor | None:
        """:meth:`forward` on the CPU with :mod:`longkv.kernels`: every norm one kernel call (float32
        weights, float32 arithmetic, one rounding, as :func:`norm32`), the pre-MLP norm fused with the
        residual add before it, RoPE read straight from the normed heads (the same arithmetic, fewer ops)."""
        c = self.config
        T, H, Hkv, D, eps = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim, c.rms_eps
        nq, nk, _ = self._split
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # float32 cos, sin per distinct RoPE
        pending: torch.Tensor | None = None  # the last block's normed MLP output, added to x by the next norm
        for i, L in enumerate(self.layers):
            rope = self.ropes[i]
            if id(rope) not in tables:
                tables[id(rope)] = rope.cos_sin(positions, torch.float32)
            cos, sin = tables[id(rope)]
            h = kernels.add_rms_norm(x, pending, L.attn_norm, eps)
            qkv = L.qkv(h, coded)  # (T, (H + 2 Hkv) D)
            q = kernels.add_rms_norm(qkv[:, :nq].contiguous().view(T * H, D), None, L.q_norm, eps)
            k = kernels.add_rms_norm(qkv[:, nq : nq + nk].contiguous().view(T * Hkv, D), None, L.k_norm, eps)
            q = kernels.rope(q.view(T, nq), H, D, cos, sin)  # (H, T, D)
            k = kernels.rope(k.view(T, nk), Hkv, D, cos, sin)
            if self.q_scale is not None:
                q = q * self.q_scale
            v = qkv[:, nq + nk :].view(T, Hkv, D).transpose(0, 1)
            o = attention(i, q, k, v, positions)  # (H, T, D)
            d = kernels.add_rms_norm(L.o(o.transpose(0, 1).reshape(T, nq), coded), None, L.post_attn_norm, eps)
            h = kernels.add_rms_norm(x, d, L.mlp_norm, eps)
            pending = kernels.add_rms_norm(gated_mlp(h, L.gate_up, L.down, gelu_tanh, coded).contiguous(), None, L.post_mlp_norm, eps)
        assert pending is not None
        if isinstance(logits_at, torch.Tensor):  # the final add and norm only for the rows that get logits
            x, pending = x[logits_at].contiguous(), pending[logits_at].contiguous()
        elif logits_at == "none":
            return None
        elif logits_at == "last":
            x, pending = x[-1:].contiguous(), pending[-1:].contiguous()
        return self._head(kernels.add_rms_norm(x, pending, self.norm, eps), coded)


# --------------------------------------------------------------------------- the family: config and weights

LOCAL_THETA = 10_000.0  # RoPE base of Gemma 3's sliding layers (HF rope_local_base_freq; fixed in llama.cpp)
PATTERN = 6  # every 6th layer global, the 5 before it sliding (HF sliding_window_pattern; llama.cpp's swa pattern)


def _layers(types: list[str], window: int, full: AttnSpec, local_theta: float,
            local_scaling: RopeScaling | None = None) -> tuple[AttnSpec, ...]:
    """One spec per layer from HF ``layer_types`` ("sliding_attention" / "full_attention")."""
    local = AttnSpec(local_theta, local_scaling, window)
    return tuple(local if t == "sliding_attention" else full for t in types)


def _types(n_layers: int, pattern: int = PATTERN) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def _hf_config(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a gemma3_text config.json: per-layer specs, window, QK-norm, scales.

    Two file formats: transformers >= 5 writes ``rope_parameters`` per layer type
    (``{"full_attention": {"rope_theta", "rope_type", "factor"}, "sliding_attention": {...}}``);
    the hub's files (transformers 4.x) carry ``rope_theta`` and ``rope_scaling`` for the
    global layers and ``rope_local_base_freq`` for the sliding ones.

    Raises:
        LongKVError: bidirectional attention (EmbeddingGemma) or attention-logit softcapping,
            which the engine does not implement; an unsupported RoPE scaling.
    """
    if cfg.get("use_bidirectional_attention"):
        raise LongKVError("this Gemma 3 config uses bidirectional attention (an embedding model): longkv runs causal decoders")
    if cfg.get("attn_logit_softcapping") is not None:
        raise LongKVError("attention-logit softcapping (attn_logit_softcapping) is not supported by longkv's attention")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and ("full_attention" in rp or "sliding_attention" in rp):
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta") or 1_000_000.0}
        local = {"rope_theta": cfg.get("rope_local_base_freq") or LOCAL_THETA}
    n_layers = fields["n_layers"]
    types = cfg.get("layer_types")
    if not (isinstance(types, list) and len(types) == n_layers):
        types = _types(n_layers, int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or PATTERN))
    window = int(cfg.get("sliding_window") or 4096)  # transformers' default
    spec = AttnSpec(float(full.get("rope_theta") or 1_000_000.0), RopeScaling.from_params(full), None)
    softcap = cfg.get("final_logit_softcapping")
    return {
        **fields,
        "layers": _layers(types, window, spec, float(local.get("rope_theta") or LOCAL_THETA), RopeScaling.from_params(local)),
        "sliding_window": window,
        "rope_theta": spec.rope_theta,  # the model-wide RoPE: the global layers'
        "rope_scaling": spec.rope_scaling,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "qk_norm": True,
        "attn_scale": float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,  # transformers' default 256
        "final_softcap": float(softcap) if softcap is not None else None,
    }


def _gguf_config(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a Gemma 3 GGUF beyond the common keys, as llama.cpp reads the file.

    llama.cpp fixes what the file does not say: sliding layers use RoPE base 10 000 without
    scaling, global layers ``rope.freq_base`` with ``rope.scaling.*``, every 6th layer global;
    the attention scale is ``head_dim ** -0.5`` except for the 27B (62 layers), whose
    ``query_pre_attn_scalar`` is ``hidden / heads`` (168; Google's gemma_pytorch config).

    Raises:
        LongKVError: attention-logit softcapping, or a RoPE scaling other than linear.
    """
    if get("attn_logit_softcapping") is not None:
        raise LongKVError("attention-logit softcapping (attn_logit_softcapping) is not supported by longkv's attention")
    window = int(get("attention.sliding_window") or 4096)
    scaling = None
    if get("rope.scaling.type") == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0:
        scaling = RopeScaling(factor=float(get("rope.scaling.factor")), kind="linear")
    elif get("rope.scaling.type") not in (None, "none", "linear"):
        raise LongKVError(f"RoPE scaling {get('rope.scaling.type')!r} in the GGUF file is not supported: longkv implements linear")
    full = AttnSpec(float(get("rope.freq_base", 1_000_000.0)), scaling, None)
    n_layers, hidden, n_heads = fields["n_layers"], fields["hidden_size"], fields["n_heads"]
    scalar = hidden / n_heads if n_layers == 62 else fields["head_dim"]
    softcap = get("final_logit_softcapping")
    return {
        **fields,
        "layers": _layers(_types(n_layers), window, full, float(get("rope.freq_base_swa", LOCAL_THETA))),
        "sliding_window": window,
        "rope_scaling": scaling,
        "attn_scale": float(scalar) ** -0.5,
        "final_softcap": float(softcap) if softcap is not None else None,
    }


def _load_weight(config: ModelConfig, name: str, w: torch.Tensor, dtype: torch.dtype, source: Source) -> torch.Tensor:
    """Norm weights stay float32: Gemma computes its norms in float32 with ``1 + w``, and rounding
    ``1 + w`` to bfloat16 would drop most of ``w`` (transformers keeps the sum in float32). HF stores
    the offset ``w``: the 1 is added here; llama.cpp's converter already added it."""
    if name.endswith("norm.weight"):
        return w.float() + 1.0 if source == "hf" else w.float()
    return w.to(dtype)


FAMILY = Family(
    model_type="gemma3_text",
    gguf_arch="gemma3",
    models="Gemma 3 text (270M-27B)",
    features="5 sliding-window layers per global one, two RoPE bases, QK-norm, four norms per block, GeGLU",
    forward=Gemma3Model,
    hf_config=_hf_config,
    gguf_config=_gguf_config,
    # four norms per block: llama.cpp's ffn_norm is Gemma's pre-MLP norm
    gguf_names={
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    load_weight=_load_weight,
    refused_model_types={
        "gemma3": "model_type 'gemma3' in config.json is Gemma 3's image-text checkpoint: longkv runs the text model "
                  "(model_type gemma3_text, e.g. gemma-3-270m or gemma-3-1b) or a Gemma 3 GGUF file",
    },
)
