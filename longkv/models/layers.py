"""Blocks shared by every architecture: RMSNorm, rotary embedding, gated MLP.

Shapes use T for tokens of the current forward, H for query heads, Hkv for
key/value heads and D for head_dim. All functions are pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from longkv import kernels
from longkv.config import AttnSpec, ModelConfig, RopeScaling, fast_bf16_matmul


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * weight`` over the last dim.

    x: (T, hidden); weight: (hidden,). The fused kernel accumulates in float32
    for bfloat16 inputs too, so no up-cast copy is needed.
    """
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


DECODE_WEIGHTS = ("int4", "int8", "mixed", "none")  # formats of a model's decode weight copies ("mixed": per matrix)
MATRIX_FORMATS = ("int4", "int8", "none")  # the format of one matrix's copy


def matrix_decode(decode: str, weight_bits: Mapping[str, int], names: Sequence[str]) -> str:
    """Decode format of one matrix made of the file tensors ``names`` (several for a fused matrix).

    ``decode`` is a model's format (:data:`DECODE_WEIGHTS`); ``"mixed"`` codes the matrix in
    int4 when the file stores every one of its tensors in 4 bits or fewer (``weight_bits``,
    by HF name; an absent name counts as 16 bits), else in int8: a Q4_K_M file keeps its
    Q6_K matrices at 8 bits. Other formats apply to every matrix.
    """
    if decode != "mixed":
        return decode
    return "int4" if names and all(weight_bits.get(n, 16) <= 4 for n in names) else "int8"


def int4_group(k: int) -> int:
    """Group size of int4 weights with ``k`` input channels: 32 (GGUF's 4-bit blocks; it matched their accuracy).

    Raises:
        ValueError: k is not a multiple of 32 (the CPU int4 kernel needs whole groups).
    """
    for g in (32,):
        if k % g == 0:
            return g
    raise ValueError(f"int4 weights need input sizes that are multiples of 32, got {k}: use weights int8")


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group asymmetric 4-bit codes of w: (N, K) -> codes (N, K) int32 in [0, 15], step and min (N, K / group) float32.

    ``w ~ codes * step + min`` per group of ``group`` input channels.
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    step = ((hi - lo) / 15).clamp_min(1e-10)
    codes = ((wg - lo[..., None]) / step[..., None]).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
    return codes, step, lo


def dequantize_int4(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: (N, K) float32."""
    n, k = codes.shape
    return (codes.float().reshape(n, k // group, group) * step[..., None] + lo[..., None]).reshape(n, k)


class Linear:
    """``y = x @ W.T + b``, with an optional int8 or int4 copy of W for few-row inputs (decode).

    A decode step multiplies a few rows by every weight matrix, so it is bound by
    memory bandwidth: reading a coded copy of W moves about a half (int8) or a
    quarter (int4) of the bytes of bfloat16; decode rows read it (see :meth:`__call__`). Where :mod:`longkv.kernels` is built, the copy is in blocks of 32 inputs
    (int8: a scale per block, GGUF's Q8_0; int4: a step and minimum per block, Q4_1),
    laid out in tiles of 8 output rows, and multiplied by
    :func:`~longkv.kernels.block_linear`; otherwise by PyTorch's CPU
    kernels (int8: one scale per output channel, ``aten._weight_int8pack_mm``; int4:
    ``aten._weight_int4pack_mm_for_cpu``). Prompt chunks are compute-bound and use W
    itself (fewer than :attr:`min_rows` rows padded to it); on a CPU without
    native bfloat16 products (:func:`~longkv.config.fast_bf16_matmul`) a bfloat16 W
    is up-cast for them and multiplied in float32 (8-10x faster there from 16 rows
    on; W stays bfloat16 in memory).

    Args:
        w: (out, in) in the compute dtype; b: (out,) or None.
        decode: format of the decode copy: ``"int8"``, ``"int4"`` or ``"none"``.

    Raises:
        ValueError: unknown ``decode``, an int4 copy of a matrix whose input size
            is not a multiple of 32, or an int8/int4 copy of a matrix off the CPU
            (both kernels are CPU kernels).
    """

    __slots__ = ("b", "bits", "decode", "group", "q", "scale", "upcast", "w")
    # Without an explicit ``coded``, up to this many rows read the coded copy: on an AVX2 CPU the
    # int8/int4 kernels stayed 1.5-10x faster than W's own product up to 32 rows (a 3072 x 576
    # matrix: int8 77 / 343 / 1343 us at 1 / 8 / 32 rows, float32 up-cast 1.1-2.1 ms). The engine
    # says which: decode tokens read the copy, prompt chunks W (``longkv.engine.step.run_batch``);
    # the coded products are row by row, so a row's result does not depend on what shares its forward.
    decode_max_rows = 32
    upcast_min_rows = 16  # below, a slow bfloat16 product still costs less than up-casting W
    min_rows = 16  # rows a product through W (coded=False) is padded to on the CPU

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, decode: str = "none") -> None:
        if decode not in MATRIX_FORMATS:
            raise ValueError(f"unknown decode weight format {decode!r}: use one of {', '.join(MATRIX_FORMATS)}")
        if decode != "none" and w.device.type != "cpu":
            raise ValueError(f"{decode} decode weights are a CPU format, the model is on {w.device}: use weights none (or auto)")
        self.w = w.contiguous()
        self.b = b
        self.decode = decode
        self.upcast = w.dtype == torch.bfloat16 and not fast_bf16_matmul(w.device)
        self.q: torch.Tensor | None = None  # the coded copy (layouts below)
        self.scale: torch.Tensor | None = None  # PyTorch's kernels: int8 (out,); int4 (in / group, out, 2) step and zero point
        self.group = 0
        self.bits = 0  # 4 or 8: q holds longkv.kernels blocks
        if decode != "none" and w.shape[1] % kernels.BLOCK == 0 and kernels.available():
            self.bits, self.group = (4 if decode == "int4" else 8), kernels.BLOCK
            self.q = kernels.pack_q4(*quantize_int4(w, kernels.BLOCK)) if decode == "int4" else kernels.pack_q8(w)
        elif decode == "int8":
            wf = w.float()
            scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
            self.q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(w.dtype)
        elif decode == "int4":
            self.group = int4_group(w.shape[1])
            codes, step, lo = quantize_int4(w, self.group)
            self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # the kernel computes (code - 8) * step + zero: zero = min + 8 * step
            self.scale = torch.stack((step, lo + 8 * step), dim=-1).transpose(0, 1).contiguous().to(w.dtype)

    def decode_bytes(self) -> int:
        """Bytes a decode step reads from this matrix (the coded copy, else W)."""
        if self.q is None:
            return self.w.nbytes
        return self.q.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def __call__(self, x: torch.Tensor, coded: bool | None = None) -> torch.Tensor:
        """x: (T, in) -> (T, out) in x's dtype. ``coded``: multiply by the coded copy (where there is one)
        or by W (False: each row's result the same for any T on the CPU); None: the copy for at most
        :attr:`decode_max_rows` rows."""
        if coded is None:
            coded = x.shape[0] <= self.decode_max_rows
        if self.q is not None and coded:
            if self.bits:
                y = kernels.block_linear(x, self.q, self.w.shape[0], self.w.shape[1], self.bits)
            elif self.decode == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scale)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return y if self.b is None else y + self.b
        m = x.shape[0]
        if coded is False and 0 < m < self.min_rows and x.device.type == "cpu":
            # Few rows through W: padded, so they take the product many rows take (a CPU BLAS multiplies
            # 1-5 float32 rows by another kernel, and bfloat16 below upcast_min_rows differently too),
            # and a prompt token's products do not depend on how many share its chunk.
            pad = torch.cat((x, x.new_zeros(self.min_rows - m, x.shape[1])))
            return self(pad, False)[:m]
        if self.upcast and m >= self.upcast_min_rows:
            return F.linear(x.float(), self.w.float(), None if self.b is None else self.b.float()).to(x.dtype)
        return F.linear(x, self.w, self.b)


def gated_mlp(
    x: torch.Tensor, gate_up: Linear, down: Linear, act: Callable[[torch.Tensor], torch.Tensor] = F.silu, coded: bool | None = None
) -> torch.Tensor:
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with gate and up fused in one matmul; SwiGLU with
    the default ``act`` (SiLU), GeGLU with :func:`gelu_tanh` (Gemma).

    x: (T, hidden); gate_up: (2 * intermediate, hidden); down: (hidden, intermediate); coded: see
    :meth:`Linear.__call__`.
    (The llama block's decode rows take the whole second half of the layer in one kernel call instead:
    :class:`longkv.kernels.AttnOutMlp`.)
    """
    gate, up = gate_up(x, coded).chunk(2, dim=-1)
    return down(act(gate) * up, coded)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_pytorch_tanh``, Gemma's MLP activation)."""
    return F.gelu(x, approximate="tanh")


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

    def __init__(self, head_dim: int, spec: AttnSpec, device: torch.device | str = "cpu", rotary_dim: int | None = None) -> None:
        d = rotary_dim or head_dim  # partial rotary: only the first rotary_dim channels turn
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        s = spec.rope_scaling
        if s is not None and s.kind == "linear":  # position interpolation: every frequency divided by the factor
            inv = inv / s.factor
        elif s is not None and s.kind in ("longrope", "freq_factors"):  # one divisor per channel pair
            inv = inv / torch.tensor(s.long_factor if s.kind == "longrope" else s.freq_factors, dtype=torch.float64, device=device)
        elif s is not None:
            inv = _llama3_inv_freq(inv, s)
        self.inv_freq = inv  # (D/2,) float64 on the model's device: angles of far positions (1 M tokens) stay exact

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int64 (may be negative for deltas) -> cos, sin: (T, D/2) of ``dtype``."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x: (..., T, D) with cos/sin: (T, R/2), R <= D rotated channels (the rest pass). Returns a new tensor."""
        half = cos.shape[-1]
        if 2 * half < x.shape[-1]:  # partial rotary: the first R channels, in halves of R/2
            return torch.cat((Rotary.apply(x[..., : 2 * half], cos, sin), x[..., 2 * half :]), dim=-1)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: (..., T, D) by positions: (T,) (absolute positions or deltas)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return self.apply(x, cos, sin)


def layer_ropes(config: ModelConfig, device: torch.device | str = "cpu") -> tuple[Rotary, ...]:
    """One :class:`Rotary` per layer, from its :class:`~longkv.config.AttnSpec`; layers with the same
    RoPE base and scaling share one object (a forward computes its cos/sin table once)."""
    made: dict[tuple[float, RopeScaling | None], Rotary] = {}
    out = []
    for spec in config.layers:
        key = (spec.rope_theta, spec.rope_scaling)
        if key not in made:
            made[key] = Rotary(config.head_dim, spec, device, config.rotary_dim)
        out.append(made[key])
    return tuple(out)


class SequenceRotary(Rotary):
    """The model's rotation with its last cos/sin table kept: one per sequence's runner, never shared.

    Every layer of one step moves its keys by the same deltas (sink pages,
    retrieved pages, contiguous positions), so 29 of 30 layers reuse the table
    instead of recomputing it. The model's own :class:`Rotary` stays stateless.
    """

    def __init__(self, rope: Rotary) -> None:
        self.inv_freq = rope.inv_freq
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[1] == dtype and last[0].shape == positions.shape and torch.equal(last[0], positions):
            return last[2], last[3]
        cos, sin = super().cos_sin(positions, dtype)
        self._last = (positions.clone(), dtype, cos, sin)
        return cos, sin
