"""Page pool: where one layer's keys and values live, for every sequence at once.

A :class:`PagePool` holds the KV of one layer (of one KV-head count and one
page format) for all the sequences of an engine, in fixed-size pages of
``page_size`` token slots. Its storage is a set of *planes*, each shaped
``(Hkv, num_pages * page_size, ...)`` (head-major, so the slots of a run of
consecutive pages are one strided view that attention reads in place), plus
the original position of every slot: ``pos: (num_pages * page_size,)`` int64.

The pool is also the block manager: every page has a reference count; a
sequence allocates *runs* of consecutive pages (:meth:`alloc`, grown in place
by :meth:`extend` when the pages after them are free) and returns them with
:meth:`release`; a prefix index or another sequence that reads the same pages
:meth:`retain` s them, so shared prefixes are stored once and freed when their
last reader lets go. Pages with no reference are free and are handed out
again; when no free run is large enough the storage grows (by half, one copy
amortised over the tokens that filled it), and it shrinks when its free tail
is over three quarters of it, so memory a sequence frees is given back.

Fragmentation: a prefix index keeps pages scattered over the storage (a
request's prompt pages stay, the pages it reserved past them go), so freed
pages end up in holes between kept ones, a sequence's run may fit none of
them, and the storage grows although most of it is free. :meth:`compact`
moves the used pages down over the holes (their order kept, so every run of
held pages stays one run) and cuts the storage to what is used plus headroom;
whoever holds slots (a :class:`~longkv.kv.cache.LayerKV`, a prefix index)
registers with :meth:`hold` and is told where its slots went. An engine calls
it between steps (:meth:`KVPools.compact`), when no slot number is in flight.

Page formats: a :class:`PageFormat` says how a token's K and V are laid out in
the planes: plain (K and V in the compute dtype) here, int8/int4 codes with
per-group scales in :mod:`longkv.kv.quant`. Every format supports every pool
operation; reads decode to the compute dtype.

Not thread-safe: an engine touches its pools from its one step thread.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import mmap
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class PageFormat:
    """Plain pages: K and V stored as they are computed.

    Attributes:
        head_dim: D.
        dtype: the compute dtype (what reads return, and here what is stored).
    """

    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def codec(self) -> str:
        """Name of the format, as ``kv_quant`` spells it."""
        return "none"

    def planes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Plane name -> (trailing shape per head and token, dtype)."""
        return {"k": ((self.head_dim,), self.dtype), "v": ((self.head_dim,), self.dtype)}

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """k, v: (Hkv, T, D) in the compute dtype -> every plane's (Hkv, T, ...) values."""
        return {"k": k, "v": v}

    def decode(self, planes: dict[str, torch.Tensor], values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The planes of some slots ((Hkv, T, ...) each) -> k, v (Hkv, T, D) in the compute dtype (v None unless ``values``).

        Plain pages return the planes themselves (views, no copy).
        """
        return planes["k"], (planes["v"] if values else None)

    def bytes_per_slot(self, n_kv_heads: int) -> int:
        """Bytes one token slot takes over every plane and its position."""
        per_head = sum(_numel(shape) * dt.itemsize for shape, dt in self.planes().values())
        return n_kv_heads * per_head + 8


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_MAPPED_BYTES = 1 << 20  # CPU storage from this size on is a memory map of its own


def _storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for a pool's planes. On the CPU, from 1 MiB on, an anonymous memory map of its
    own (zero pages until written): freeing it (a resize, a compaction) gives its pages back to the system,
    where a block from malloc's heap of a few MiB would stay with the process, and a long-running server
    that resizes and compacts its pools would grow (RSS 5 GB for 450 MiB of pools)."""
    nbytes = _numel(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < _MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the map alive


def _trim_heap() -> None:
    """Free heap pages back to the system where the C library can (glibc's ``malloc_trim(0)``), else nothing."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None  # the C library's malloc_trim, False where there is none


class SlotHolder(Protocol):
    """Something that keeps slot numbers of a pool (told where they went when the pool is compacted)."""

    def relocate(self, pool: PagePool, slot: Callable[[int], int]) -> None:
        """Replace every slot ``s`` of ``pool`` this object keeps by ``slot(s)``."""


class PagePool:
    """Pages of KV for one layer, shared by the sequences of an engine, with reference counts.

    Args:
        n_kv_heads: Hkv of the pages.
        fmt: the page format.
        page_size: token slots per page.
        device: where the planes live (``"cpu"``, ``"cuda"``, ...).

    Storage: ``planes[name]``: (Hkv, slots, ...) per :meth:`PageFormat.planes`;
    ``pos``: (slots,) int64, the original position of the token in each slot;
    ``slots = num_pages * page_size``. Slot ``s`` is in page ``s // page_size``.
    """

    def __init__(self, n_kv_heads: int, fmt: PageFormat, page_size: int = 64, device: torch.device | str | None = None) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.n_kv_heads, self.fmt, self.page_size = n_kv_heads, fmt, page_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.planes = {
            name: torch.empty(n_kv_heads, 0, *shape, dtype=dt, device=self.device) for name, (shape, dt) in fmt.planes().items()
        }
        self.pos = torch.empty(0, dtype=torch.int64, device=self.device)
        self.refs: list[int] = []  # reference count per page
        self._free: list[list[int]] = []  # sorted, disjoint [start, length] runs of free pages
        self.used_pages = 0
        self.multi_ref_pages = 0  # pages with more than one reference (0: nobody shares, writes need no check)
        self._holders: weakref.WeakSet[SlotHolder] = weakref.WeakSet()  # told where their slots went on compact()
        self.compactions = 0

    # ---------------------------------------------------------------- sizes
    @property
    def num_pages(self) -> int:
        """Pages the storage holds (used or free)."""
        return len(self.refs)

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.used_pages

    def page_bytes(self) -> int:
        """Bytes of one page over every plane and its positions."""
        return self.page_size * self.fmt.bytes_per_slot(self.n_kv_heads)

    def bytes(self) -> int:
        """Bytes of storage allocated (used pages and free ones)."""
        return self.num_pages * self.page_bytes()

    def used_bytes(self) -> int:
        """Bytes of the pages some sequence or index holds."""
        return self.used_pages * self.page_bytes()

    # ---------------------------------------------------------------- storage
    def _resize(self, num_pages: int) -> None:
        """Grow or cut the storage to ``num_pages`` (only free pages are ever cut)."""
        old = self.num_pages
        if num_pages == old:
            return
        keep = min(old, num_pages) * self.page_size
        slots = num_pages * self.page_size
        for name, t in self.planes.items():
            u = _storage((t.shape[0], slots, *t.shape[2:]), t.dtype, self.device)
            u[:, :keep] = t[:, :keep]
            self.planes[name] = u
        pos = _storage((slots,), torch.int64, self.device).fill_(-1)
        pos[:keep] = self.pos[:keep]
        self.pos = pos
        if num_pages > old:
            self.refs.extend([0] * (num_pages - old))
            self._add_free(old, num_pages - old)
        else:
            assert all(r == 0 for r in self.refs[num_pages:]), "cutting pages still in use"
            del self.refs[num_pages:]
            self._cut_free(num_pages)

    def _add_free(self, start: int, n: int) -> None:
        """Mark pages [start, start + n) free, merging with neighbouring free runs."""
        i = bisect.bisect_left(self._free, [start, 0])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            i -= 1
            self._free[i][1] += n
        else:
            self._free.insert(i, [start, n])
        if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == self._free[i + 1][0]:
            self._free[i][1] += self._free.pop(i + 1)[1]

    def _take_free(self, start: int, n: int) -> None:
        """Remove pages [start, start + n) (all free, inside one free run) from the free runs."""
        i = bisect.bisect_right(self._free, [start, float("inf")]) - 1
        s, length = self._free[i]
        assert s <= start and start + n <= s + length, "pages are not free"
        pieces = [[s, start - s], [start + n, s + length - start - n]]
        self._free[i : i + 1] = [p for p in pieces if p[1] > 0]
        for p in range(start, start + n):
            self.refs[p] = 1
        self.used_pages += n

    def _cut_free(self, num_pages: int) -> None:
        while self._free and self._free[-1][0] >= num_pages:
            self._free.pop()
        if self._free and self._free[-1][0] + self._free[-1][1] > num_pages:
            self._free[-1][1] = num_pages - self._free[-1][0]

    def _tail_free(self) -> int:
        """Free pages at the end of the storage."""
        if self._free and self._free[-1][0] + self._free[-1][1] == self.num_pages:
            return self._free[-1][1]
        return 0

    # ---------------------------------------------------------------- block manager
    def alloc(self, n: int) -> int:
        """A run of ``n`` consecutive pages, each with one reference; returns its first page.

        First fit among the free runs; grows the storage when none is large enough.
        """
        assert n > 0
        for s, length in self._free:
            if length >= n:
                self._take_free(s, n)
                return s
        tail = self._tail_free()
        start = self.num_pages - tail
        self._resize(max(start + n, self.num_pages + self.num_pages // 2))
        self._take_free(start, n)
        return start

    def extend(self, start: int, n: int, extra: int) -> bool:
        """Grow the run [start, start + n) in place by ``extra`` pages if those pages are free.

        Pages past the end of the storage count as free (the storage grows).
        Returns False, changing nothing, when a page in the way is in use.
        """
        end = start + n
        if any(self.refs[p] for p in range(end, min(end + extra, self.num_pages))):
            return False
        if end + extra > self.num_pages:
            self._resize(max(end + extra, self.num_pages + self.num_pages // 2))
        self._take_free(end, extra)
        return True

    def retain(self, start: int, n: int) -> None:
        """One more reference to each page in [start, start + n) (all in use)."""
        for p in range(start, start + n):
            assert self.refs[p] > 0, "retaining a free page"
            self.refs[p] += 1
            if self.refs[p] == 2:
                self.multi_ref_pages += 1

    def release(self, start: int, n: int, trim: bool = True) -> None:
        """Drop one reference to each page in [start, start + n); pages left with none are free.

        With ``trim`` the storage shrinks when its free tail is over 3/4 of it.
        """
        freed_at = -1
        for p in range(start, start + n):
            assert self.refs[p] > 0, "releasing a free page"
            self.refs[p] -= 1
            if self.refs[p] == 1:
                self.multi_ref_pages -= 1
            if self.refs[p] == 0:
                self.used_pages -= 1
                if freed_at < 0:
                    freed_at = p
            elif freed_at >= 0:
                self._add_free(freed_at, p - freed_at)
                freed_at = -1
        if freed_at >= 0:
            self._add_free(freed_at, start + n - freed_at)
        tail = self._tail_free()
        if trim and tail and 4 * tail > 3 * self.num_pages:  # mostly free at the end: give memory back, keep headroom
            used_end = self.num_pages - tail
            self._resize(used_end + used_end // 2)

    def hold(self, holder: SlotHolder) -> None:
        """Register ``holder`` (kept weakly) as keeping slot numbers of this pool: :meth:`compact` relocates them."""
        self._holders.add(holder)

    def compact(self, headroom: float = 0.5) -> bool:
        """Move the used pages down over the free ones and cut the storage to them plus ``headroom`` of them.

        Done only where the free pages outnumber the used ones (else returns
        False, nothing moved). Used pages keep their order, so the pages of any
        run that is held whole (a sequence's run, a shared span) stay one run;
        every registered holder is told the new slot of each slot it keeps. No
        slot number may be held elsewhere meanwhile (an engine calls it between
        steps). Returns True when it moved pages.
        """
        free = self.free_pages
        if free <= self.used_pages:
            return False
        ps, used = self.page_size, self.used_pages
        new_page = [-1] * self.num_pages
        runs: list[tuple[int, int, int]] = []  # (old first page, new first page, pages) of each used run
        at = 0
        prev = 0
        for s, length in [*self._free, [self.num_pages, 0]]:
            if s > prev:
                runs.append((prev, at, s - prev))
                for p in range(prev, s):
                    new_page[p] = at + p - prev
                at += s - prev
            prev = s + length
        assert at == used
        size = used + math.ceil(used * headroom)
        slots = size * ps
        for name, t in self.planes.items():
            u = _storage((t.shape[0], slots, *t.shape[2:]), t.dtype, self.device)
            for old, new, n in runs:
                u[:, new * ps : (new + n) * ps] = t[:, old * ps : (old + n) * ps]
            self.planes[name] = u
        pos = _storage((slots,), torch.int64, self.device).fill_(-1)
        for old, new, n in runs:
            pos[new * ps : (new + n) * ps] = self.pos[old * ps : (old + n) * ps]
        self.pos = pos
        self.refs = [r for r in self.refs if r] + [0] * (size - used)
        self._free = [[used, size - used]] if size > used else []
        self.compactions += 1

        def slot(s: int) -> int:
            p = new_page[s // ps]
            assert p >= 0, "a holder keeps a slot of a free page"
            return p * ps + s % ps

        for holder in list(self._holders):
            holder.relocate(self, slot)
        return True

    def slot_range(self, start: int, n: int) -> slice:
        """Slots of pages [start, start + n)."""
        return slice(start * self.page_size, (start + n) * self.page_size)

    def pages_of(self, slot0: int, n: int) -> tuple[int, int]:
        """First page and page count covering slots [slot0, slot0 + n) (n > 0)."""
        first = slot0 // self.page_size
        return first, -(-(slot0 + n) // self.page_size) - first

    def retain_slots(self, slot0: int, n: int) -> None:
        """:meth:`retain` the pages under slots [slot0, slot0 + n)."""
        if n > 0:
            self.retain(*self.pages_of(slot0, n))

    def release_slots(self, slot0: int, n: int, trim: bool = True) -> None:
        """:meth:`release` the pages under slots [slot0, slot0 + n)."""
        if n > 0:
            self.release(*self.pages_of(slot0, n), trim=trim)


class KVPools:
    """The page pools of one engine: one per (layer, KV heads, page format), made on first use.

    Args:
        page_size: token slots per page.
        device: where every pool's planes live.
    """

    def __init__(self, page_size: int = 64, device: torch.device | str | None = None) -> None:
        self.page_size = page_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._pools: dict[tuple[int, int, PageFormat], PagePool] = {}

    def get(self, layer: int, n_kv_heads: int, fmt: PageFormat) -> PagePool:
        """The pool of ``layer`` for pages of ``n_kv_heads`` heads in format ``fmt``."""
        key = (layer, n_kv_heads, fmt)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = PagePool(n_kv_heads, fmt, self.page_size, self.device)
        return pool

    def compact(self) -> int:
        """:meth:`PagePool.compact` every pool whose free pages outnumber its used ones; returns how many moved.

        Call only between steps: every slot number held outside a registered holder goes stale. After a
        compaction, the C library is asked to give free heap memory back to the system (glibc's
        ``malloc_trim``): the planes are memory maps, but the small buffers around them (positions, a prefix
        cache's logits) come from the heap, which a long-running server otherwise keeps growing.
        """
        moved = sum(p.compact() for p in self._pools.values())
        if moved:
            _trim_heap()
        return moved

    def compactions(self) -> int:
        """Compactions since start, over every pool."""
        return sum(p.compactions for p in self._pools.values())

    def used_pages(self) -> int:
        """Pages held over every pool."""
        return sum(p.used_pages for p in self._pools.values())

    def free_pages(self) -> int:
        """Free pages over every pool (allocated storage nobody holds)."""
        return sum(p.free_pages for p in self._pools.values())

    def used_bytes(self) -> int:
        """Bytes of the pages held over every pool (a shared page counts once)."""
        return sum(p.used_bytes() for p in self._pools.values())

    def bytes(self) -> int:
        """Bytes of storage allocated over every pool."""
        return sum(p.bytes() for p in self._pools.values())
