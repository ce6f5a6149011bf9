"""Tiered KV: a hot set in RAM, every other page coded in RAM or on disk, loaded when read.

A selection policy (block top-k) keeps every page of a long input but reads
only a few of them per query block. :class:`TieredLayerKV` holds one layer's
cache in three parts, all in cache order:

* **pinned** tokens (the sink pages) in RAM, in the compute dtype;
* **cold** pages in a :class:`ColdStore`: coded (none / int8 / int4, the codecs
  of :mod:`longkv.kv.quant`) in RAM (:class:`RamStore`) or in a file on disk
  (:class:`DiskStore`, read with ``pread`` into fresh buffers, so only the pages
  being read occupy process memory; the OS page cache may keep more);
* the **hot** tail (the newest ``hot_tokens`` tokens or more: the local window
  and the prompt chunk being prefilled) in RAM, in the compute dtype.

Appending fills the tail; whole pages that fall out of the hot set are coded
and moved to the cold store (spilled), oldest first. Reads (:meth:`TieredLayerKV.read`,
:meth:`TieredLayerKV.gather_pages`) assemble any range from the three parts, so
code written against :class:`~longkv.kv.cache.LayerKV` works unchanged.

Resident bytes: :meth:`TieredLayerKV.bytes` counts what lives in RAM (pinned +
hot + a RAM store); :meth:`TieredLayerKV.disk_bytes` what lives on disk.
Tokens are only appended and cut back (:meth:`truncate`), never evicted.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import torch

from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV, page_format
from longkv.kv.pool import PagePool
from longkv.kv.quant import CodedRows, dequantize, quantize

CODECS = ("none", "int8", "int4")
COLD = ("ram", "disk")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"1.5G"``, ``"2000000"`` -> bytes (``K/M/G`` are binary).

    Raises:
        LongKVError: not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise LongKVError(f"cannot read {text!r} as a size in bytes: write e.g. 1GiB, 512MiB or 1073741824")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _codec_bits(codec: str) -> int:
    if codec not in CODECS:
        raise LongKVError(f"unknown KV tier codec {codec!r}: use one of {', '.join(CODECS)}")
    return 0 if codec == "none" else int(codec[3:])


class ColdStore:
    """Whole pages of one layer outside the hot set, in cache order (page 0 = first cold page)."""

    page_size: int
    n_pages: int

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append whole pages: k, v (Hkv, P * page_size, D) compute dtype; pos (P * page_size,) int64."""
        raise NotImplementedError

    def read(self, p0: int, p1: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Pages [p0, p1) decoded: k, v (Hkv, (p1 - p0) * page_size, D) (v None unless ``values``), pos."""
        raise NotImplementedError

    def truncate(self, n_pages: int) -> None:
        """Forget every page from ``n_pages`` on."""
        raise NotImplementedError

    def ram_bytes(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Free the storage."""


class RamStore(ColdStore):
    """Cold pages coded in RAM (a plain or quantized layer store underneath)."""

    def __init__(self, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, codec: str = "int8") -> None:
        _codec_bits(codec)  # a clear error for an unknown codec
        self.page_size = page_size
        fmt = page_format(head_dim, dtype, codec)
        self.inner = LayerKV(n_kv_heads, head_dim, page_size, dtype, codec=codec, pool=PagePool(n_kv_heads, fmt, page_size, "cpu"))

    @property
    def n_pages(self) -> int:  # type: ignore[override]
        return self.inner.n // self.page_size

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.inner.append(k, v, pos)

    def read(self, p0: int, p1: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        lo, hi = p0 * self.page_size, p1 * self.page_size
        return self.inner.read(lo, hi, values)

    def truncate(self, n_pages: int) -> None:
        self.inner.truncate(n_pages * self.page_size)

    def ram_bytes(self) -> int:
        return self.inner.bytes()

    def close(self) -> None:
        self.inner.clear()


class DiskStore(ColdStore):
    """Cold pages coded in a file: one fixed-size record per page, written with pwrite, read with pread.

    Record of a page (int8/int4): K codes, K step, K min, V codes, V step, V
    min, positions; with codec ``none`` K and V in the compute dtype. The file
    is created in ``directory`` (default ``$LONGKV_HOME/kv``) and unlinked at
    once, so the OS frees it when the store is closed or the process ends.

    Raises:
        LongKVError: the directory cannot be created or written.
    """

    def __init__(
        self, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, codec: str = "int8",
        directory: str | Path | None = None,
    ) -> None:
        self.bits = _codec_bits(codec)
        self.page_size, self.dtype, self.head_dim = page_size, dtype, head_dim
        self.group = min(32, head_dim)
        h, ps = n_kv_heads, page_size
        if self.bits:
            code, side = head_dim * self.bits // 8, head_dim // self.group
            shapes = [(h, ps, code, torch.uint8), (h, ps, side, torch.float16), (h, ps, side, torch.float16)] * 2
        else:
            shapes = [(h, ps, head_dim, dtype)] * 2
        self.fields = [*shapes, (1, ps, 1, torch.int64)]
        self.field_bytes = [a * b * c * t.itemsize for a, b, c, t in self.fields]
        self.record = sum(self.field_bytes)
        if directory is None:
            from longkv.config import longkv_home

            directory = longkv_home() / "kv"
            Path(directory).parent.mkdir(parents=True, exist_ok=True)
        elif not Path(directory).is_dir():  # a folder of the user's: never created behind their back
            raise LongKVError(f"tier_dir {directory} is not a folder: create it first, or leave tier_dir unset for $LONGKV_HOME/kv")
        try:
            Path(directory).mkdir(exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="kv-", suffix=".pages", dir=directory)
            os.unlink(name)
        except OSError as e:
            raise LongKVError(f"cannot create a KV page file in {directory}: {e.strerror}; set tier_dir to a writable folder") from None
        self.fd: int | None = fd
        self.n_pages = 0

    def _encode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        if self.bits:
            parts = [*quantize(k, self.bits, self.group), *quantize(v, self.bits, self.group)]
        else:
            parts = [k.to(self.dtype), v.to(self.dtype)]
        return [*parts, pos[None, :, None]]

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        p = pos.numel() // self.page_size
        assert self.fd is not None and p * self.page_size == pos.numel(), "whole pages only"
        cols = []
        for t in self._encode(k, v, pos):  # (H, P * ps, X) -> (P, H * ps * X) bytes, page-major
            h, _, x = t.shape
            t = t.contiguous().view(h, p, self.page_size, x).transpose(0, 1).contiguous()
            cols.append(t.view(p, -1).view(torch.uint8))
        buf = torch.cat(cols, dim=1).contiguous().numpy().tobytes()
        try:
            written = os.pwrite(self.fd, buf, self.n_pages * self.record)
        except OSError as e:
            raise LongKVError(f"cannot write KV pages to disk: {e.strerror}; free disk space or raise the resident budget") from None
        if written != len(buf):
            raise LongKVError("short write of KV pages to disk: free disk space or raise the resident budget")
        self.n_pages += p

    def read(self, p0: int, p1: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        assert self.fd is not None and 0 <= p0 <= p1 <= self.n_pages
        p = p1 - p0
        raw = bytearray(p * self.record)
        if p:
            got = os.preadv(self.fd, [raw], p0 * self.record)
            assert got == len(raw), "short read of KV pages"
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(p, self.record) if p else torch.empty(0, self.record, dtype=torch.uint8, device="cpu")
        parts, at = [], 0
        for (h, ps, x, dt), nb in zip(self.fields, self.field_bytes, strict=True):
            col = rows[:, at : at + nb].contiguous().view(dt).view(p, h, ps, x).transpose(0, 1)
            parts.append(col.reshape(h, p * ps, x))
            at += nb
        pos = parts[-1][0, :, 0].clone()
        if self.bits:
            kc, ks, km, vc, vs, vm = parts[:6]
            k = dequantize(kc, ks, km, self.bits, self.group, self.dtype)
            v = dequantize(vc, vs, vm, self.bits, self.group, self.dtype) if values else None
        else:
            k, v = parts[0], parts[1] if values else None
        return k, v, pos

    def truncate(self, n_pages: int) -> None:
        self.n_pages = min(self.n_pages, n_pages)  # records past the end are overwritten by later writes

    def disk_bytes(self) -> int:
        return self.n_pages * self.record

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.n_pages = 0


class TieredLayerKV(LayerKV):
    """One layer's cache: pinned sink pages + cold pages (RAM or disk, coded) + a hot tail in RAM.

    Its pages are its own (``shareable`` is False): a prefix index never attaches them.

    Args:
        n_kv_heads, head_dim, page_size, dtype: as :class:`~longkv.kv.cache.LayerKV`.
        pinned_tokens: tokens at the start always kept in RAM (sinks; a multiple of ``page_size``).
        hot_tokens: most tokens the tail holds in RAM after an append (RAM peaks
            at ``hot_tokens`` + the tokens of one append); when it grows past that,
            whole pages are spilled to the cold store, oldest first, until
            ``max(min_hot, 3/4 hot_tokens)`` remain (spilling in batches keeps the
            cost of repacking the tail low).
        min_hot: newest tokens always left in RAM (the local window and a chunk).
        cold: ``"ram"`` or ``"disk"``.
        codec: ``"none"``, ``"int8"`` or ``"int4"`` for cold pages.
        directory: where a disk store puts its file.
        device: where the pinned pages and the hot tail live (the engine's device); cold
            pages stay in host RAM or on disk and are read back onto it.

    Raises:
        LongKVError: unknown cold tier or codec, sizes not whole pages.
    """

    shareable = False

    def __init__(
        self, n_kv_heads: int, head_dim: int, page_size: int = 64, dtype: torch.dtype = torch.float32, *,
        pinned_tokens: int = 64, hot_tokens: int = 4096, min_hot: int = 0, cold: str = "disk", codec: str = "int8",
        directory: str | Path | None = None, device: torch.device | str = "cpu",
    ) -> None:
        if cold not in COLD:
            raise LongKVError(f"unknown KV tier {cold!r}: use one of {', '.join(COLD)}")
        if pinned_tokens % page_size or hot_tokens < page_size:
            raise LongKVError(f"tiered KV needs whole pinned pages and at least one hot page (page size {page_size})")
        self.page_size, self.acc = page_size, None
        self.pinned_tokens, self.hot_tokens = pinned_tokens, hot_tokens
        self.spill_to = min(hot_tokens, max(min_hot, hot_tokens - hot_tokens // 4))
        self._device = torch.device(device)
        fmt = page_format(head_dim, dtype)
        self.head = LayerKV(n_kv_heads, head_dim, page_size, dtype, pool=PagePool(n_kv_heads, fmt, page_size, self._device))
        self.tail = LayerKV(n_kv_heads, head_dim, page_size, dtype, pool=PagePool(n_kv_heads, fmt, page_size, self._device))
        self.cold: ColdStore = (
            RamStore(n_kv_heads, head_dim, page_size, dtype, codec)
            if cold == "ram"
            else DiskStore(n_kv_heads, head_dim, page_size, dtype, codec, directory)
        )
        self._n_kv_heads = n_kv_heads

    # ---------------------------------------------------------------- sizes
    @property
    def n(self) -> int:  # type: ignore[override]
        return self.head.n + self.cold.n_pages * self.page_size + self.tail.n

    @property
    def n_kv_heads(self) -> int:
        return self._n_kv_heads

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def cold_end(self) -> int:
        """First cache index of the hot tail."""
        return self.head.n + self.cold.n_pages * self.page_size

    @property
    def capacity(self) -> int:
        return self.n

    def bytes(self) -> int:
        """Bytes in RAM: pinned + hot tail + a RAM cold store."""
        return self.head.bytes() + self.tail.bytes() + self.cold.ram_bytes()

    def used_bytes(self) -> int:
        return self.head.used_bytes() + self.tail.used_bytes() + self.cold.ram_bytes()

    def disk_bytes(self) -> int:
        """Bytes of cold pages on disk."""
        return self.cold.disk_bytes()

    # ---------------------------------------------------------------- writes
    def reserve(self, n_tokens: int) -> None:
        self.tail.reserve(min(n_tokens, self.hot_tokens + 2 * self.page_size))

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: (Hkv, T, D); positions (T,). Fills the pinned pages first, then the tail, then spills."""
        room = self.pinned_tokens - self.head.n if self.cold.n_pages == 0 and self.tail.n == 0 else 0
        if room > 0:
            self.head.append(k[:, :room], v[:, :room], positions[:room])
            k, v, positions = k[:, room:], v[:, room:], positions[room:]
        if positions.numel():
            self.tail.reserve(self.tail.n + positions.numel())  # exact growth: no doubling past the hot set
            self.tail.append(k, v, positions)
        if self.tail.n <= self.hot_tokens:
            return
        spill = (self.tail.n - self.spill_to) // self.page_size * self.page_size
        if spill > 0:
            tk, tv, tp = self.tail.view()
            self.cold.write(tk[:, :spill].cpu(), tv[:, :spill].cpu(), tp[:spill].cpu())
            self.tail.keep(torch.arange(spill, self.tail.n, device=self.device))

    def truncate(self, n: int) -> None:
        """Forget every token from index ``n`` on; pages cut back into are moved back to the tail."""
        assert 0 <= n <= self.n
        if n >= self.cold_end:
            self.tail.truncate(n - self.cold_end)
            return
        self.tail.truncate(0)
        if n <= self.head.n:
            self.cold.truncate(0)
            self.head.truncate(n)
            return
        first = (n - self.head.n) // self.page_size  # cold page holding index n
        k, v, pos = (t.to(self.device) for t in self.cold.read(first, first + 1))  # type: ignore[union-attr]
        assert v is not None
        self.cold.truncate(first)
        keep = n - self.cold_end
        if keep:
            self.tail.append(k[:, :keep], v[:, :keep], pos[:keep])

    def keep(self, indices: torch.Tensor) -> None:
        raise LongKVError("a tiered KV cache keeps every token (selection policies only): do not combine tiers with eviction")

    def clear(self) -> None:
        self.head.clear()
        self.tail.clear()
        self.cold.truncate(0)

    def close(self) -> None:
        """Free RAM and the disk file."""
        self.clear()
        self.cold.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the file closes with the process
            self.cold.close()

    # ---------------------------------------------------------------- reads
    def read(self, lo: int, hi: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Tokens [lo, hi) from whichever parts hold them: k, v (Hkv, hi - lo, D) (v None unless ``values``), pos."""
        assert 0 <= lo <= hi <= self.n
        h0, c1 = self.head.n, self.cold_end
        ks, vs, ps_ = [], [], []

        def add(part: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]) -> None:
            ks.append(part[0])
            vs.append(part[1])
            ps_.append(part[2])

        if lo < h0:
            add(self.head.read(lo, min(hi, h0), values))
        if lo < c1 and hi > h0:
            a, b = max(lo, h0) - h0, min(hi, c1) - h0
            p0, p1 = a // self.page_size, -(-b // self.page_size)
            k, v, pos = self.cold.read(p0, p1, values)
            s = slice(a - p0 * self.page_size, b - p0 * self.page_size)
            dev = self.device
            add((k[:, s].to(dev), None if v is None else v[:, s].to(dev), pos[s].to(dev)))
        if hi > c1:
            add(self.tail.read(max(lo, c1) - c1, hi - c1, values))
        if len(ks) == 1:
            return ks[0], vs[0], ps_[0]
        if not ks:
            return self.head.read(0, 0, values)
        v_out = torch.cat(vs, dim=1) if values else None  # type: ignore[arg-type]
        return torch.cat(ks, dim=1), v_out, torch.cat(ps_)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every token, assembled (a copy when anything is cold)."""
        k, v, pos = self.read(0, self.n)
        assert v is not None
        return k, v, pos

    def segments(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every token as one assembled part (see :meth:`LayerKV.segments`)."""
        return [self.view()]

    def decode_parts(self) -> list[tuple[torch.Tensor | CodedRows, torch.Tensor | CodedRows, torch.Tensor]]:
        """:meth:`segments` (cold pages are decoded as they are assembled)."""
        return list(self.segments())

    def kernel_reads(self, dtype: torch.dtype) -> bool:
        """False: cold pages are not in the pool's planes (see :meth:`LayerKV.kernel_reads`)."""
        return False

    def positions(self) -> torch.Tensor:
        return self.read(0, self.n, values=False)[2]

    def gather_pages(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens of the given pages (sorted ids), reading runs of consecutive pages at once."""
        ids = page_ids.tolist()
        ks, vs, ps_ = [], [], []
        i = 0
        while i < len(ids):
            j = i
            while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                j += 1
            k, v, pos = self.read(ids[i] * self.page_size, min((ids[j] + 1) * self.page_size, self.n))
            assert v is not None
            ks.append(k)
            vs.append(v)
            ps_.append(pos)
            i = j + 1
        if not ks:
            k, v, pos = self.head.view()
            return k[:, :0], v[:, :0], pos[:0]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1), torch.cat(ps_)
