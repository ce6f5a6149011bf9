"""int8 / int4 KV codecs: per-group asymmetric quantization, and the coded page format of the pool.

Each token's key (and value) vector of every KV head is cut into groups of
``group`` channels; a group stores its minimum and its step (``scale``) in
float16 and one code per channel: ``x ~ code * scale + min`` with codes in
``[0, 2**bits - 1]``. int4 codes are packed two per byte. Keys and values are
coded separately with their own scales, per token, so appending a token never
re-codes others and eviction just drops rows (composable with any policy).

Bytes per token and KV head (head_dim D, group g), for K and V each:
``D * bits / 8 + 4 * D / g``: with D = 64, g = 32, int8 is 72 bytes and int4
40 bytes, against 128 in bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longkv.errors import LongKVError
from longkv.kv.pool import PageFormat

_SCALE_DTYPE = torch.float16
_MIN_STEP = 1e-4  # smallest stored step: a constant group still decodes exactly to its value


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code x: (H, T, D) float -> codes (H, T, D * bits / 8) uint8, scale and minimum (H, T, D / group) float16.

    Raises:
        LongKVError: bits not 4 or 8, or D not a multiple of ``group`` (or group odd for int4).
    """
    h, t, d = x.shape
    if bits not in (4, 8) or d % group or group % 2:
        raise LongKVError(f"cannot code head_dim {d} as int{bits} in groups of {group}: use int8/int4 and a group dividing head_dim")
    xg = x.float().reshape(h, t, d // group, group)
    lo = xg.amin(-1).to(_SCALE_DTYPE)
    step = ((xg.amax(-1) - lo.float()) / (2**bits - 1)).clamp_min(_MIN_STEP).to(_SCALE_DTYPE)
    codes = ((xg - lo.float()[..., None]) / step.float()[..., None]).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    codes = codes.reshape(h, t, d)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, step, lo


def dequantize(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: (H, T, D) of ``dtype``."""
    if bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
    h, t, d = codes.shape
    xg = codes.float().reshape(h, t, d // group, group) * step.float()[..., None] + lo.float()[..., None]
    return xg.reshape(h, t, d).to(dtype)


@dataclass(frozen=True)
class CodedFormat(PageFormat):
    """Pages of int8 or int4 codes: per token and KV head, K and V codes plus a step and a minimum per group.

    Planes: ``k``, ``v``: (D * bits / 8,) uint8 codes; ``k_step``, ``k_min``,
    ``v_step``, ``v_min``: (D / group,) float16. Reads decode to ``dtype``.
    """

    bits: int = 8
    group: int = 32

    @property
    def codec(self) -> str:
        return f"int{self.bits}"

    def planes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        codes, side = (self.head_dim * self.bits // 8,), (self.head_dim // self.group,)
        return {
            "k": (codes, torch.uint8), "k_step": (side, _SCALE_DTYPE), "k_min": (side, _SCALE_DTYPE),
            "v": (codes, torch.uint8), "v_step": (side, _SCALE_DTYPE), "v_min": (side, _SCALE_DTYPE),
        }  # fmt: skip

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        kc, ks, km = quantize(k, self.bits, self.group)
        vc, vs, vm = quantize(v, self.bits, self.group)
        return {"k": kc, "k_step": ks, "k_min": km, "v": vc, "v_step": vs, "v_min": vm}

    def decode(self, planes: dict[str, torch.Tensor], values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded copies: k, v (Hkv, T, D) of ``dtype`` (v None unless ``values``)."""
        k = dequantize(planes["k"], planes["k_step"], planes["k_min"], self.bits, self.group, self.dtype)
        if not values:
            return k, None
        return k, dequantize(planes["v"], planes["v_step"], planes["v_min"], self.bits, self.group, self.dtype)


@dataclass(frozen=True)
class CodedRows:
    """The coded keys and values of some slots of a pool, read in place: its planes over those slots.

    A part of an int8 cache as a decode step's attention reads it (``LayerKV.decode_parts`` gives
    ``(rows, rows, positions)``): :func:`longkv.kernels.decode_attention` takes int8 codes as they
    are; every other reader calls :meth:`decode`.

    Attributes:
        fmt: the pool's format.
        planes: ``fmt.planes()`` over the slots, each (Hkv, n, ...) (views of the pool's planes).
    """

    fmt: CodedFormat
    planes: dict[str, torch.Tensor]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Hkv, n, D) of the decoded keys (or values)."""
        h, n, _ = self.planes["k"].shape
        return h, n, self.fmt.head_dim

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded copies: k, v (Hkv, n, D) in the format's compute dtype."""
        k, v = self.fmt.decode(self.planes)
        assert v is not None
        return k, v

    def rows(self, lo: int, hi: int) -> CodedRows:
        """Slots ``[lo, hi)`` of these rows, in place (views of the same planes)."""
        return CodedRows(self.fmt, {name: t[:, lo:hi] for name, t in self.planes.items()})


@dataclass(frozen=True)
class SeenAt:
    """Keys attention sees at other positions than the ones they were cached rotated at: the i-th at ``at + i``
    (an eviction policy that renumbers what it kept, ``KVPolicy.key_positions``).

    A decode step's kernel (:func:`longkv.kernels.decode_attention`) reads them in place and turns the query
    once per run of keys with one shift (q . R(d) k = R(-d) q . k); every other reader calls :meth:`keys_seen`.

    Attributes:
        keys: (Hkv, n, D) in the compute dtype, or int8 :class:`CodedRows`, as cached.
        cached: (n,) int64, contiguous: the positions they were cached at.
        at: the position the first one is seen at.
        rope: the layer's RoPE (``longkv.models.layers.Rotary``; its ``inv_freq`` is what the kernel turns by).
    """

    keys: torch.Tensor | CodedRows
    cached: torch.Tensor
    at: int
    rope: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Hkv, n, D) of the keys."""
        h, n, d = self.keys.shape
        return h, n, d

    def keys_seen(self) -> torch.Tensor:
        """(Hkv, n, D) copies of the keys rotated to where they are seen."""
        k = self.keys.decode()[0] if isinstance(self.keys, CodedRows) else self.keys
        seen = self.at + torch.arange(self.cached.shape[0], dtype=torch.int64, device=self.cached.device)
        return self.rope.rotate(k, seen - self.cached)


Part = tuple[torch.Tensor | CodedRows | SeenAt, torch.Tensor | CodedRows, torch.Tensor]
"""A part of a cache as attention reads it: k, v (Hkv, n, D) tensors or int8 :class:`CodedRows` (k also
:class:`SeenAt`), positions (n,)."""


def decoded(segments: Sequence[Part]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``segments`` with every :class:`CodedRows` part decoded and every :class:`SeenAt` key rotated to where it
    is seen: [(k, v (Hkv, n_i, D), positions (n_i,))]."""
    out = []
    for k, v, pos in segments:
        if isinstance(k, SeenAt):
            k = k.keys_seen()
            if isinstance(v, CodedRows):
                v = v.decode()[1]
        elif isinstance(k, CodedRows):
            k, v = k.decode()
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        out.append((k, v, pos))
    return out


def drop_front(parts: Sequence[Part], m: int) -> list[Part]:
    """``parts`` without their first ``m`` tokens, in place (views; a part cut in two keeps its tail)."""
    out: list[Part] = []
    for k, v, pos in parts:
        n = pos.shape[0]
        if m >= n:
            m -= n
            continue
        if m:
            if isinstance(k, CodedRows):
                k = v = k.rows(m, n)
            else:
                assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)  # (never SeenAt: parts as cached)
                k, v = k[:, m:], v[:, m:]
            pos, m = pos[m:], 0
        out.append((k, v, pos))
    return out


def coded_format(head_dim: int, dtype: torch.dtype, codec: str, group: int = 32) -> CodedFormat:
    """The page format of ``codec`` (``"int8"`` or ``"int4"``) for keys of ``head_dim``.

    Raises:
        LongKVError: another codec, or head_dim not a multiple of ``group`` (capped at head_dim).
    """
    if codec not in ("int8", "int4"):
        raise LongKVError(f"unknown KV codec {codec!r}: use none, int8 or int4")
    bits, group = int(codec[3:]), min(group, head_dim)
    if head_dim % group or group % 2:
        raise LongKVError(f"cannot store head_dim {head_dim} as int{bits} in groups of {group}: use kv_quant int8 or int4")
    return CodedFormat(head_dim, dtype, bits, group)
