"""int8 / int4 KV codecs: per-group asymmetric quantization, and a quantized layer store.

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

import torch

from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV, _round_up

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


class QuantizedLayerKV(LayerKV):
    """A :class:`~longkv.kv.cache.LayerKV` whose keys and values are stored as int8 or int4 codes.

    Storage (capacity C): ``k``, ``v``: (Hkv, C, D * bits / 8) uint8 codes;
    ``k_step``, ``k_min``, ``v_step``, ``v_min``: (Hkv, C, D / group) float16;
    ``pos``: (C,) int64. :meth:`view` and :meth:`gather_pages` return decoded
    tensors of ``dtype``; :meth:`bytes` counts every stored byte.

    Raises:
        LongKVError: bits not 4 or 8, or head_dim not a multiple of ``group``.
    """

    def __init__(
        self, n_kv_heads: int, head_dim: int, page_size: int = 64, dtype: torch.dtype = torch.float32,
        bits: int = 8, group: int = 32,
    ) -> None:
        group = min(group, head_dim)
        if bits not in (4, 8) or head_dim % group or group % 2:
            raise LongKVError(f"cannot store head_dim {head_dim} as int{bits} in groups of {group}: use kv_quant int8 or int4")
        super().__init__(n_kv_heads, head_dim * bits // 8, page_size, torch.uint8)
        self.bits, self.group, self.dtype, self.head_dim = bits, group, dtype, head_dim
        side = (n_kv_heads, 0, head_dim // group)
        self.k_step, self.k_min, self.v_step, self.v_min = (torch.empty(side, dtype=_SCALE_DTYPE) for _ in range(4))

    def _side(self) -> list[torch.Tensor]:
        return [self.k_step, self.k_min, self.v_step, self.v_min]

    def bytes(self) -> int:
        return super().bytes() + sum(t.nbytes for t in self._side())

    def used_bytes(self) -> int:
        return self.n * self.bytes() // self.capacity if self.capacity else 0

    def _resize(self, capacity: int) -> None:
        capacity = _round_up(max(capacity, self.n), self.page_size)
        if capacity == self.capacity:
            return
        old = self._side()
        super()._resize(capacity)
        new = []
        for t in old:
            u = torch.empty(t.shape[0], capacity, t.shape[2], dtype=t.dtype)
            u[:, : self.n] = t[:, : self.n]
            new.append(u)
        self.k_step, self.k_min, self.v_step, self.v_min = new

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: (Hkv, T, D) in the compute dtype; coded on the way in."""
        kc, ks, km = quantize(k, self.bits, self.group)
        vc, vs, vm = quantize(v, self.bits, self.group)
        n0, t = self.n, k.shape[1]
        super().append(kc, vc, positions)  # grows every buffer (see _resize) and writes the codes
        for dst, src in zip(self._side(), (ks, km, vs, vm), strict=True):
            dst[:, n0 : n0 + t] = src

    def _decode(self, idx: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = dequantize(self.k[:, idx], self.k_step[:, idx], self.k_min[:, idx], self.bits, self.group, self.dtype)
        v = dequantize(self.v[:, idx], self.v_step[:, idx], self.v_min[:, idx], self.bits, self.group, self.dtype)
        return k, v

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded copies: k, v: (Hkv, n, D) of ``dtype``; positions: (n,)."""
        k, v = self._decode(slice(0, self.n))
        return k, v, self.pos[: self.n]

    def read(self, lo: int, hi: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Decoded tokens [lo, hi): k, v (Hkv, hi - lo, D) of ``dtype`` (v None unless ``values``), positions."""
        idx = slice(lo, hi)
        if values:
            k, v = self._decode(idx)
            return k, v, self.pos[idx]
        k = dequantize(self.k[:, idx], self.k_step[:, idx], self.k_min[:, idx], self.bits, self.group, self.dtype)
        return k, None, self.pos[idx]

    def gather_pages(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = (page_ids[:, None] * self.page_size + torch.arange(self.page_size)[None, :]).reshape(-1)
        idx = idx[idx < self.n]
        k, v = self._decode(idx)
        return k, v, self.pos[idx]

    def keep(self, indices: torch.Tensor) -> None:
        m = indices.numel()
        if m == self.n:
            return
        for t in self._side():
            t[:, :m] = t[:, indices]
        super().keep(indices)  # moves codes and positions, then shrinks every buffer when far too large
