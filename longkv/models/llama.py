"""Llama-family forward (Llama 2/3.x, SmolLM2, Mistral; Qwen2 adds q/k/v biases).

The model owns projections, norms, RoPE and the MLP. Where keys and values
go, and what each query attends to, is not its business: every layer hands its
rotated q/k/v to an ``attention`` callback supplied by the engine, which
appends to the KV cache, applies the KV policy and returns the attention output.

Contract shared by every architecture module (see ``longkv.models.build``):
``Model(config, weights)`` and ``Model.forward(input_ids, positions, attention, logits_at)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from longkv import kernels
from longkv.config import ModelConfig, RopeScaling
from longkv.errors import LongKVError
from longkv.models.family import Family, Source
from longkv.models.layers import Linear, Rotary, gated_mlp, layer_ropes, matrix_decode, rms_norm

# attention(layer, q (H, T, D), k (Hkv, T, D), v (Hkv, T, D), positions (T,)) -> (H, T, D)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Layer:
    __slots__ = ("attn_norm", "down", "fused_in", "fused_out", "gate_up", "k_norm", "mlp_norm", "o", "q_norm", "qkv")

    def __init__(
        self, w: dict[str, torch.Tensor], prefix: str, bias: bool, decode: str, qk_norm: bool = False,
        weight_bits: Mapping[str, int] | None = None,
    ) -> None:
        def get(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in w:
                raise LongKVError(f"weight {key} missing from the model file: the file is incomplete or not a supported model")
            return w[key]

        self.attn_norm = get("input_layernorm.weight")
        self.mlp_norm = get("post_attention_layernorm.weight")
        self._matrices(get, prefix, bias, decode, weight_bits or {})
        # QK-norm (Qwen3): one (head_dim,) weight shared by the query heads, one by the key heads
        self.q_norm = get("self_attn.q_norm.weight") if qk_norm else None
        self.k_norm = get("self_attn.k_norm.weight") if qk_norm else None
        # decode rows take each half of the layer in one kernel call where every matrix has kernel tiles
        # (bound by the model, which knows the shapes: LlamaModel.__init__)
        self.fused_in: kernels.AttnIn | None = None
        self.fused_out: kernels.AttnOutMlp | None = None

    def _matrices(
        self, get: Callable[[str], torch.Tensor], prefix: str, bias: bool, decode: str, weight_bits: Mapping[str, int]
    ) -> None:
        """The four projections; each one's decode format from :func:`matrix_decode`."""

        def linear(names: Sequence[str], b: torch.Tensor | None = None) -> Linear:
            # one matmul for q, k and v (and one for gate and up): fewer kernel calls per token
            w = torch.cat([get(n) for n in names], dim=0) if len(names) > 1 else get(names[0])
            return Linear(w, b, matrix_decode(decode, weight_bits, [prefix + n for n in names]))

        qkv = [f"self_attn.{p}_proj.weight" for p in "qkv"]
        self.qkv = linear(qkv, torch.cat([get(f"self_attn.{p}_proj.bias") for p in "qkv"]) if bias else None)
        self.o = linear(["self_attn.o_proj.weight"])
        self.gate_up = linear(["mlp.gate_proj.weight", "mlp.up_proj.weight"])
        self.down = linear(["mlp.down_proj.weight"])


def head_decode(decode_weights: str) -> str:
    """Decode format of the LM head under a model's ``decode_weights``: int8 for int4 and mixed."""
    return "int8" if decode_weights in ("int4", "mixed") else decode_weights


class LlamaModel:
    """Decoder-only transformer with RMSNorm, RoPE, GQA and a SwiGLU MLP.

    Args:
        config: model shape.
        weights: HF-named tensors already in the compute dtype.
        decode_weights: also keep ``"int8"`` or ``"int4"`` copies of the matrices for
            decode steps, or ``"mixed"`` (per matrix, by ``weight_bits``: see
            :func:`~longkv.models.layers.matrix_decode`); ``"none"``: none (see
            :class:`~longkv.models.layers.Linear`). Prefill is unchanged. CPU only.
        weight_bits: bits per weight each tensor had in the file, by HF name
            (:attr:`~longkv.loading.LoadedModel.weight_bits`); only ``"mixed"`` reads it.

    Every weight is on one device (:attr:`device`, that of the embedding); callers pass
    ids and positions on it.

    Raises:
        LongKVError: a weight is missing.
        ValueError: int8/int4 decode weights off the CPU.
    """

    layers: Sequence[_Layer]  # a family's block may extend _Layer (Gemma 3's four norms)

    decode_layers: kernels.DecodeLayers | None = None  # the one-call decode step, where the model allows it (decode_step)

    @cached_property
    def coded(self) -> bool:
        """Whether some weight matrix has a coded decode copy (int8 or int4), so that a forward's
        ``coded`` argument picks between two products."""
        return self.lm_head.q is not None or any(
            lin.q is not None for L in self.layers for lin in (L.qkv, L.o, L.gate_up, L.down)
        )

    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none",
        weight_bits: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        if "model.embed_tokens.weight" not in weights:
            raise LongKVError("weight model.embed_tokens.weight missing from the model file: the file is incomplete")
        if "model.norm.weight" not in weights:
            raise LongKVError("weight model.norm.weight (GGUF output_norm) missing from the model file: the file is incomplete")
        self.device = weights["model.embed_tokens.weight"].device
        bias = config.attention_bias
        weights = fold_attn_scale(config, weights)
        self.layers = [_Layer(weights, f"model.layers.{i}.", bias, decode_weights, config.qk_norm, weight_bits) for i in range(config.n_layers)]
        c = config
        for L in self.layers:
            if L.qkv.bits and L.q_norm is None:
                assert L.qkv.q is not None
                L.fused_in = kernels.AttnIn(L.attn_norm, c.rms_eps, L.qkv.q, L.qkv.bits, L.qkv.b, c.n_heads, c.n_kv_heads, c.head_dim)
            if L.o.bits and L.gate_up.bits and L.down.bits:
                assert L.o.q is not None and L.gate_up.q is not None and L.down.q is not None
                L.fused_out = kernels.AttnOutMlp(L.o.q, L.o.bits, L.o.w.shape[1], L.mlp_norm, c.rms_eps, L.gate_up.q, L.gate_up.bits,
                                                 L.down.q, L.down.bits, L.down.w.shape[1])  # fmt: skip
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        head = self.embed if config.tie_embeddings else weights.get("lm_head.weight", self.embed)
        # The LM head stays int8 under int4 (and mixed): it is often the embedding kept at 8 bits in
        # the file (SmolLM2's Q8_0), and 4-bit logits moved decode perplexity by +5 % there.
        self.lm_head = Linear(head, None, head_decode(decode_weights))
        self.decode_weights = decode_weights
        self.ropes = layer_ropes(config, self.device)  # per layer, from its AttnSpec
        self.dtype = self.embed.dtype
        c = config
        self._split = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
        # A decode step in one kernel call where every layer has both fused halves, one RoPE serves all
        # and no layer slides (see decode_step); models that change the forward keep theirs.
        plain = type(self).forward is LlamaModel.forward and type(self)._forward_fused is LlamaModel._forward_fused
        halves = [(L.fused_in, L.fused_out) for L in self.layers if L.fused_in is not None and L.fused_out is not None]
        if plain and len(halves) == len(self.layers) and len({id(r) for r in self.ropes}) == 1 and all(s.window is None for s in c.layers):
            try:
                self.decode_layers = kernels.DecodeLayers(halves)
            except ValueError:  # layers of different shapes: decode steps go layer by layer
                self.decode_layers = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_at: Literal["last", "all", "none"] | torch.Tensor = "last",
        coded: bool | None = None,
    ) -> torch.Tensor | None:
        """Run the decoder over T new tokens.

        Args:
            input_ids: (T,) int64 token ids, on :attr:`device`.
            positions: (T,) int64 absolute positions of those tokens, on :attr:`device`.
            attention: the engine's attention callback (see module docstring).
            logits_at: which positions get logits: only the last (prefill chunks,
                decode), all (perplexity, parity tests), or none (middle chunks:
                the LM head is skipped entirely), or a (R,) int64 tensor of row
                indices (the last token of each sequence of a batched chunk).
            coded: every matrix product by the layer's coded decode copy where it has one (True),
                by the weights themselves (False), or by row count (None: the copy for at most
                ``Linear.decode_max_rows`` rows).

        Returns:
            logits (1, T or R, vocab) in float32, or None for ``"none"``.
        """
        c = self.config
        T = input_ids.shape[0]
        x = F.embedding(input_ids, self.embed)  # (T, hidden)
        if coded is None:
            coded = Linear.decode_max_rows >= T
        if kernels.fused_ok(x) and c.head_dim <= kernels.MAX_HEAD_DIM:
            return self._forward_fused(x, positions, attention, logits_at, coded)
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(rope) -> cos, sin (T, D/2): once per distinct RoPE
        nq, nk, _ = self._split
        for i, L in enumerate(self.layers):
            rope = self.ropes[i]
            if id(rope) not in tables:
                tables[id(rope)] = rope.cos_sin(positions, self.dtype)
            cos, sin = tables[id(rope)]
            h = rms_norm(x, L.attn_norm, c.rms_eps)
            qkv = L.qkv(h, coded)  # (T, (H + 2 Hkv) D)
            qk = qkv[:, : nq + nk].view(T, -1, c.head_dim)  # (T, H + Hkv, D)
            if L.q_norm is not None and L.k_norm is not None:
                qk = torch.cat((rms_norm(qk[:, : c.n_heads], L.q_norm, c.rms_eps), rms_norm(qk[:, c.n_heads :], L.k_norm, c.rms_eps)), dim=1)
            # RoPE on q and k in one go: (T, H + Hkv, D) -> (H + Hkv, T, D)
            qk = Rotary.apply(qk.transpose(0, 1), cos, sin)
            q, k = qk[: c.n_heads], qk[c.n_heads :]  # (H, T, D), (Hkv, T, D)
            v = qkv[:, nq + nk :].view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)
            o = attention(i, q, k, v, positions)  # (H, T, D)
            x = x + L.o(o.transpose(0, 1).reshape(T, nq), coded)
            x = x + gated_mlp(rms_norm(x, L.mlp_norm, c.rms_eps), L.gate_up, L.down, coded=coded)
        return self._logits(x, logits_at, coded)

    def _forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionFn, logits_at: Literal["last", "all", "none"] | torch.Tensor,
        coded: bool,
    ) -> torch.Tensor | None:
        """:meth:`forward` on the CPU with :mod:`longkv.kernels`: each residual add fused with the next
        RMSNorm, RoPE read straight from the projection's rows (the same arithmetic, fewer ops); the rows
        of a coded forward through each layer's fused halves where it has them."""
        c = self.config
        T = x.shape[0]
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # float32 cos, sin per distinct RoPE
        nq, nk, _ = self._split
        heads = c.n_heads + c.n_kv_heads
        pending: torch.Tensor | None = None  # the last block's output, added to x by the next norm
        for i, L in enumerate(self.layers):
            rope = self.ropes[i]
            if id(rope) not in tables:
                tables[id(rope)] = rope.cos_sin(positions, torch.float32)
            cos, sin = tables[id(rope)]
            if coded and L.fused_in is not None:  # a decode step's rows: norm, projection and RoPE in one call
                qk, v = L.fused_in(x, pending, cos, sin)
            else:
                h = kernels.add_rms_norm(x, pending, L.attn_norm, c.rms_eps)
                qkv = L.qkv(h, coded)  # (T, (H + 2 Hkv) D)
                rows = qkv[:, : nq + nk]
                if L.q_norm is not None and L.k_norm is not None:
                    qk = rows.view(T, heads, c.head_dim)
                    rows = torch.cat((rms_norm(qk[:, : c.n_heads], L.q_norm, c.rms_eps), rms_norm(qk[:, c.n_heads :], L.k_norm, c.rms_eps)), dim=1).view(T, -1)
                qk = kernels.rope(rows, heads, c.head_dim, cos, sin)  # (H + Hkv, T, D)
                v = qkv[:, nq + nk :].view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)
            q, k = qk[: c.n_heads], qk[c.n_heads :]
            o = attention(i, q, k, v, positions).transpose(0, 1).reshape(T, nq)  # (H, T, D) -> (T, H D)
            if coded and L.fused_out is not None:  # output projection, norm and MLP in one call
                pending = L.fused_out(x, o)
            else:
                h = kernels.add_rms_norm(x, L.o(o, coded), L.mlp_norm, c.rms_eps)
                pending = gated_mlp(h, L.gate_up, L.down, coded=coded)
        assert pending is not None
        if isinstance(logits_at, torch.Tensor):  # the final add and norm only for the rows that get logits
            x, pending = x[logits_at], pending[logits_at]
        elif logits_at == "none":
            return None
        elif logits_at == "last":
            x, pending = x[-1:], pending[-1:]
        return self.lm_head(kernels.add_rms_norm(x, pending, self.norm, c.rms_eps), coded).float()

    def decode_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: list[int], meta: list[int], nseg: list[int],
        q_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode token for each of B sequences through every layer in one kernel call
        (:class:`longkv.kernels.DecodeLayers`, present as :attr:`decode_layers` where the model allows it):
        the same kernels in the same order as :meth:`forward` with a decode batch, so the same logits.

        Args:
            input_ids, positions: (B,) int64, one token per sequence (every product by the coded copies).
            kv, meta, nseg: each layer's cache of each sequence as the kernel takes them: the slot claimed
                for the new token (``LayerKV.claim``) and the parts attention reads, that slot included
                (keys seen at other positions than they were cached at turn by this model's RoPE).
            q_out: (n_layers, B, n_heads, head_dim) in the compute dtype: filled with every layer's rotated
                queries (for policies that keep them), or None.

        Returns:
            logits (B, vocab) float32.
        """
        assert self.decode_layers is not None
        x = F.embedding(input_ids, self.embed)  # (B, hidden)
        cos, sin = self.ropes[0].cos_sin(positions, torch.float32)
        out = self.decode_layers(x, kv, positions, cos, sin, meta, nseg, self.ropes[0].inv_freq, q_out)
        return self.lm_head(kernels.add_rms_norm(x, out, self.norm, self.config.rms_eps), True).float()

    def _logits(self, x: torch.Tensor, logits_at: Literal["last", "all", "none"] | torch.Tensor, coded: bool) -> torch.Tensor | None:
        c = self.config
        if isinstance(logits_at, torch.Tensor):
            x = x[logits_at]
        elif logits_at == "none":
            return None
        elif logits_at == "last":
            x = x[-1:]
        return self.lm_head(rms_norm(x, self.norm, c.rms_eps), coded).float()


def fold_attn_scale(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the queries scaled so that the engine's plain ``head_dim ** -0.5`` attention gives
    the model's: ``config.attn_scale`` on every channel, and LongRoPE's ``attention_factor ** 2`` on the
    rotated ones (HF multiplies cos and sin, so q.k of the rotated channels, by it; pass-through channels
    of a partial rotary are not scaled). Each layer's q projection (weight and bias) is scaled per channel,
    or, under QK-norm, its q-norm weight. New tensors; ``weights`` is not changed; returned as is when
    nothing scales."""
    c = config
    ratio = (c.attn_scale if c.attn_scale is not None else c.head_dim**-0.5) * math.sqrt(c.head_dim)
    scale = torch.full((c.head_dim,), ratio, dtype=torch.float64)
    s = c.rope_scaling
    if s is not None and s.kind == "longrope":
        scale[: c.rotary_dim or c.head_dim] *= s.attention_factor**2
    if torch.allclose(scale, torch.ones_like(scale), rtol=1e-12, atol=0):
        return weights
    out = dict(weights)
    names = ("self_attn.q_norm.weight",) if c.qk_norm else ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
    for i in range(c.n_layers):
        for n in names:
            key = f"model.layers.{i}.{n}"
            if key in out:
                w = out[key]
                per_row = scale.to(torch.float32).repeat(w.shape[0] // c.head_dim)  # q rows: head after head
                out[key] = (w.float() * per_row.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    return out


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for its interleaved RoPE.

    llama.cpp's converter stores each llama-family head's rows as interleaved pairs
    (x0, x_half, x1, x_half+1, ...); this forward (like HF) rotates the two halves of
    each head, so the rows go back in halves order.
    ``w``: (n_heads * head_dim, ...) for weights or (n_heads * head_dim,) for biases.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_llama_weight(config: ModelConfig, name: str, w: torch.Tensor, dtype: torch.dtype, source: Source) -> torch.Tensor:
    """A llama-family weight as the forward reads it: GGUF q/k rows back in halves order."""
    if source == "gguf" and ".self_attn.q_proj." in name:
        w = unpermute_rope_rows(w, config.n_heads)
    elif source == "gguf" and ".self_attn.k_proj." in name:
        w = unpermute_rope_rows(w, config.n_kv_heads)
    return w.to(dtype)


def llama_gguf_config(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    """Llama 3.x RoPE scaling from a GGUF file: llama.cpp writes it as the ``rope_freqs`` tensor (one
    frequency divisor per rotated channel pair), not as metadata."""
    if "rope_freqs.weight" not in tensors:
        return fields
    if not isinstance(tensors, Mapping):
        raise LongKVError("this GGUF has a rope_freqs tensor but its values were not passed: load the file with longkv.loading.load")
    factors = tuple(float(x) for x in np.asarray(tensors["rope_freqs.weight"], dtype=np.float64).reshape(-1))
    return {**fields, "rope_scaling": RopeScaling(factor=max(factors), kind="freq_factors", freq_factors=factors)}


FAMILY = Family(
    model_type="llama",
    gguf_arch="llama",
    models="Llama 2/3.x, SmolLM/SmolLM2, TinyLlama",
    features="RMSNorm, RoPE (Llama 3 scaling), GQA, SwiGLU",
    forward=LlamaModel,
    gguf_config=llama_gguf_config,
    gguf_config_tensors=("rope_freqs.weight",),
    load_weight=load_llama_weight,
)
