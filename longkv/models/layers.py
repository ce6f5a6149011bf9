"""Blocks shared by every architecture: RMSNorm, rotary embedding, gated MLP.

Shapes use T for tokens of the current forward, H for query heads, Hkv for
key/value heads and D for head_dim. All functions are pure.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longkv.config import ModelConfig, RopeScaling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * weight`` over the last dim.

    x: (T, hidden); weight: (hidden,). The fused kernel accumulates in float32
    for bfloat16 inputs too, so no up-cast copy is needed.
    """
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class Linear:
    """``y = x @ W.T + b``, with an optional int8 copy of W for few-row inputs (decode).

    A decode step multiplies one row by every weight matrix, so it is bound by
    memory bandwidth: reading W as int8 (per-output-channel scales, symmetric)
    through ``torch.ops.aten._weight_int8pack_mm`` moves half the bytes of
    bfloat16 and runs ~3x faster here. Many-row inputs (prefill chunks) are
    compute-bound and use W itself, where that kernel is slower.

    w: (out, in) in the compute dtype; b: (out,) or None.
    """

    __slots__ = ("b", "scale", "w", "w8")
    int8_max_rows = 4

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, int8: bool = False) -> None:
        self.w = w.contiguous()
        self.b = b
        self.w8: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        if int8:
            wf = w.float()
            scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
            self.w8 = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(w.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w8 is not None and x.shape[0] <= self.int8_max_rows:
            y = torch.ops.aten._weight_int8pack_mm(x, self.w8, self.scale)
            return y if self.b is None else y + self.b
        return F.linear(x, self.w, self.b)


def gated_mlp(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate and up fused in one matmul.

    x: (T, hidden); gate_up: (2 * intermediate, hidden); down: (hidden, intermediate).
    """
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth
    # ramp in between (same formula as Meta's reference and HF's "llama3" rope_type).
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


class Rotary:
    """Rotary position embedding (RoPE, Su et al. 2021), "rotate halves" layout as in HF.

    Because a rotation by position ``p`` followed by one by ``d`` equals one by
    ``p + d``, keys cached already rotated at their original position can be moved
    to any other position at attention time with :meth:`rotate` by the delta;
    this is how policies assign in-cache positions (StreamingLLM, InfLLM).
    """

    def __init__(self, config: ModelConfig) -> None:
        d = config.head_dim
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        if config.rope_scaling is not None:
            inv = _llama3_inv_freq(inv, config.rope_scaling)
        self.inv_freq = inv  # (D/2,) float64: angles of far positions (1 M tokens) stay exact
        # The last table computed: every layer of one step moves its keys by the same deltas
        # (sink pages, retrieved pages), so 29 of 30 layers reuse it instead of recomputing.
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int64 (may be negative for deltas) -> cos, sin: (T, D/2) of ``dtype``."""
        last = self._last
        if last is not None and last[1] == dtype and last[0].shape == positions.shape and torch.equal(last[0], positions):
            return last[2], last[3]
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self._last = (positions.clone(), dtype, cos, sin)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x: (..., T, D) with cos/sin: (T, D/2). Returns a new tensor."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: (..., T, D) by positions: (T,) (absolute positions or deltas)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return self.apply(x, cos, sin)
