"""Per-sequence KV: a layer's cached tokens as a page table over a shared :class:`~longkv.kv.pool.PagePool`.

Each layer of a sequence sees its cached tokens in logical order (increasing
original position), cut into pages of ``page_size`` tokens: page ``i`` holds
tokens ``[i * page_size, (i + 1) * page_size)`` of the cache (not of the input:
after an eviction the kept tokens are packed together again). Keys are stored
already rotated by RoPE at their **original** position, and that position is
kept for every token, so attention can move any key to another position by
rotating it by the difference (see ``longkv.models.layers.Rotary``).

Where the tokens live: first any number of *shared* spans (slots of the pool
that a prefix index or another sequence also reads: read-only here, their pages
reference-counted), then the sequence's *own* run of consecutive pages, which
appends grow (in place when the next pages of the pool are free, else by moving
to a larger run). Attaching a cached prefix is a page-table edit, not a copy;
writing over shared tokens (an eviction) first copies the survivors into an own
run (copy on write).

Freeing is real: :meth:`LayerKV.keep` and :meth:`LayerKV.drop_pages` pack the
survivors and give pages back to the pool when the run is far larger than what
is left, and :meth:`bytes` counts the pages the layer actually holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from longkv import kernels
from longkv.errors import LongKVError
from longkv.kv.pool import PageFormat, PagePool
from longkv.kv.quant import CodedFormat, CodedRows, coded_format


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def page_format(head_dim: int, dtype: torch.dtype, codec: str = "none") -> PageFormat:
    """The page format for ``codec`` (``"none"``, ``"int8"``, ``"int4"``). Raises LongKVError for another codec."""
    if codec == "none":
        return PageFormat(head_dim, dtype)
    return coded_format(head_dim, dtype, codec)


class LayerKV:
    """Keys, values and original positions of one layer's cached tokens: a page table over a pool.

    Args:
        n_kv_heads, head_dim: shape of the keys.
        page_size: tokens per page.
        dtype: the compute dtype (what reads return).
        codec: page format: ``"none"`` (stored as computed), ``"int8"`` or ``"int4"`` codes.
        pool: the pool to take pages from (an engine's, shared by its sequences);
            by default a pool of this layer's own.

    Only the first ``n`` tokens are valid; ``capacity`` (tokens) is a multiple of
    ``page_size`` past the shared spans.

    Raises:
        LongKVError: unknown codec, or a head_dim the codec cannot store.
    """

    def __init__(
        self, n_kv_heads: int, head_dim: int, page_size: int = 64, dtype: torch.dtype = torch.float32, *,
        codec: str = "none", pool: PagePool | None = None,
    ) -> None:
        fmt = page_format(head_dim, dtype, codec)
        if pool is None:
            pool = PagePool(n_kv_heads, fmt, page_size)
        assert pool.fmt == fmt and pool.n_kv_heads == n_kv_heads and pool.page_size == page_size, "pool of another shape"
        self.pool, self.page_size, self.dtype = pool, page_size, dtype
        self._plain = fmt.codec == "none"
        self._c_write = pool.device.type == "cpu" and kernels.available()  # appends in one C call (coded too)
        # int8 pages a decode step's attention reads as codes (decode_parts): 56 % of bfloat16's bytes moved
        self._coded_reads = isinstance(fmt, CodedFormat) and fmt.bits == 8 and self._c_write
        self.shared: list[tuple[int, int]] = []  # (first slot, tokens): read-only spans, pages retained
        self.shared_n = 0
        self.run_start, self.run_pages = 0, 0  # own run of pages
        self.n_own = 0
        # Per-token scores a policy accumulates over time (H2O): (Hkv, <= n) float32 or None.
        # keep() reindexes them with the tokens; the policy pads them for new tokens.
        self.acc: torch.Tensor | None = None
        pool.hold(self)

    def relocate(self, pool: PagePool, slot: Callable[[int], int]) -> None:
        """The pool moved its pages (:meth:`PagePool.compact`; a layer holds slots of its own pool only): point the
        shared spans and the own run at their new slots."""
        self.shared = [(slot(s), n) for s, n in self.shared]
        self.run_start = slot(self._own0()) // self.page_size if self.run_pages else 0

    def __del__(self) -> None:  # a dropped sequence gives its pages back (no tensor work: GC may run anywhere)
        if sys.is_finalizing() or not hasattr(self, "pool"):
            return
        for s, n in self.shared:
            self.pool.release_slots(s, n, trim=False)
        if self.run_pages:
            self.pool.release(self.run_start, self.run_pages, trim=False)
        self.shared, self.run_pages = [], 0

    shareable = True  # its pages can be attached to other sequences (a prefix index)

    # ---------------------------------------------------------------- sizes
    @property
    def n(self) -> int:
        return self.shared_n + self.n_own

    @property
    def codec(self) -> str:
        return self.pool.fmt.codec

    @property
    def capacity(self) -> int:
        """Tokens the layer can hold without taking more pages (shared spans + own run)."""
        return self.shared_n + self.run_pages * self.page_size

    @property
    def n_pages(self) -> int:
        """Pages holding at least one cached token."""
        return -(-self.n // self.page_size)

    @property
    def n_kv_heads(self) -> int:
        return self.pool.n_kv_heads

    @property
    def device(self) -> torch.device:
        """Where the layer's pages are read from (its pool's device)."""
        return self.pool.device

    def bytes(self) -> int:
        """Bytes of the pages this layer holds (own run + pages under shared spans) and its accumulated scores."""
        pages = self.run_pages + sum(self.pool.pages_of(s, n)[1] for s, n in self.shared)
        acc = 0 if self.acc is None else self.acc.nbytes
        return pages * self.pool.page_bytes() + acc

    def disk_bytes(self) -> int:
        """Bytes of this layer's pages on disk (a tiered store's cold pages; 0 here)."""
        return 0

    def used_bytes(self) -> int:
        """Bytes of the ``n`` valid tokens (every plane + positions)."""
        return self.n * self.pool.fmt.bytes_per_slot(self.n_kv_heads)

    # ---------------------------------------------------------------- storage
    def _own0(self) -> int:
        return self.run_start * self.page_size

    def _set_run(self, pages: int) -> None:
        """Make the own run exactly ``pages`` pages long (moving its tokens when it cannot grow in place)."""
        pool = self.pool
        if pages == self.run_pages:
            return
        if pages < self.run_pages:
            pool.release(self.run_start + pages, self.run_pages - pages)
            self.run_pages = pages
            return
        if self.run_pages == 0:
            self.run_start, self.run_pages = pool.alloc(pages), pages
            return
        if pool.extend(self.run_start, self.run_pages, pages - self.run_pages):
            self.run_pages = pages
            return
        self._move_run(pages)

    def _writes_shared(self, t: int) -> bool:
        """Whether appending ``t`` tokens writes into a page of the run that another reader holds."""
        first = self.n_own // self.page_size
        last = min((self.n_own + t - 1) // self.page_size, self.run_pages - 1)
        refs, r0 = self.pool.refs, self.run_start
        return any(refs[r0 + p] > 1 for p in range(first, last + 1))

    def _run_shared(self) -> bool:
        """Whether another reader (a fork, a prefix index) holds a page of the own run."""
        refs = self.pool.refs
        return any(refs[p] > 1 for p in range(self.run_start, self.run_start + self.run_pages))

    def _move_run(self, pages: int) -> None:
        """Copy the own tokens into a fresh run of ``pages`` pages and let go of the old run (copy on write)."""
        pool = self.pool
        start = pool.alloc(pages)
        src, dst = slice(self._own0(), self._own0() + self.n_own), slice(start * self.page_size, start * self.page_size + self.n_own)
        for t in pool.planes.values():
            t[:, dst] = t[:, src]
        pool.pos[dst] = pool.pos[src]
        pool.release(self.run_start, self.run_pages)
        self.run_start, self.run_pages = start, pages

    def _cow(self) -> None:
        """Copy on write: the own run's full pages become a shared span, its last partial page is copied to a new run."""
        ps, pool = self.page_size, self.pool
        full = self.n_own // ps
        if full == 0:
            self._move_run(self.run_pages)
            return
        old_start, old_pages, rest = self.run_start, self.run_pages, self.n_own - full * ps
        self.shared.append((self._own0(), full * ps))  # this layer's reference to those pages carries over
        self.shared_n += full * ps
        start = pool.alloc(max(old_pages - full, 1))
        src = slice((old_start + full) * ps, (old_start + full) * ps + rest)
        dst = slice(start * ps, start * ps + rest)
        for t in pool.planes.values():
            t[:, dst] = t[:, src]
        pool.pos[dst] = pool.pos[src]
        if old_pages > full:
            pool.release(old_start + full, old_pages - full)
        self.run_start, self.run_pages, self.n_own = start, max(old_pages - full, 1), rest

    def _resize(self, capacity: int) -> None:
        """Own run sized to hold ``capacity`` tokens in all (never fewer than it holds)."""
        own = max(capacity - self.shared_n, self.n_own)
        self._set_run(_round_up(own, self.page_size) // self.page_size)

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` in total without a later reallocation."""
        if n_tokens > self.capacity:
            self._resize(n_tokens)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Add T tokens at the end.

        k, v: (Hkv, T, D) in the compute dtype (coded on the way in for a coded
        format); positions: (T,) int64, each larger than every cached position.
        Takes pages geometrically when full (call :meth:`reserve` to avoid that).
        """
        t = k.shape[1]
        pool = self.pool
        a = self.claim(t)
        dst = slice(a, a + t)
        planes = pool.planes
        if self._plain:
            if not (self._c_write and kernels.kv_write(planes["k"], planes["v"], pool.pos, a, k, v, positions)):
                planes["k"][:, dst] = k
                planes["v"][:, dst] = v
                pool.pos[dst] = positions
        elif not (self._c_write and isinstance(fmt := pool.fmt, CodedFormat)
                  and kernels.kv_write_coded(planes, pool.pos, a, k, v, positions, fmt.bits, fmt.group)):  # fmt: skip
            for name, x in pool.fmt.encode(k, v).items():
                planes[name][:, dst] = x
            pool.pos[dst] = positions

    def claim(self, t: int) -> int:
        """Room for ``t`` more tokens at the end, counted in from now on; returns the pool slot of the first
        (slots ``[slot, slot + t)``, consecutive in the pool's planes).

        What :meth:`append` does before it writes: copy on write where a reader holds the page written
        next, growth of the own run. The caller writes the tokens' keys, values and positions there
        before anything reads the cache (a decode step's kernel does, see ``longkv.engine.runner``).
        """
        if self.pool.multi_ref_pages and self._writes_shared(t):
            self._cow()  # a reader (a fork, a prefix index) holds a page written next: never write under it
        if self.n_own + t > self.run_pages * self.page_size:  # grow the own run geometrically
            self._resize(self.shared_n + max(self.n_own + t, 2 * self.run_pages * self.page_size))
        a = self.run_start * self.page_size + self.n_own
        self.n_own += t
        return a

    # ---------------------------------------------------------------- reads
    def _spans(self) -> list[tuple[int, int]]:
        """(first slot, tokens) of every part of the cache, in logical order."""
        own = [(self._own0(), self.n_own)] if self.n_own else []
        return self.shared + own

    def _decode(self, idx: slice | torch.Tensor, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        planes = self.pool.planes
        if self._plain:  # the hot path: views of the planes
            return planes["k"][:, idx], (planes["v"][:, idx] if values else None), self.pool.pos[idx]
        planes = {name: t[:, idx] for name, t in planes.items() if values or not name.startswith("v")}
        k, v = self.pool.fmt.decode(planes, values)
        return k, v, self.pool.pos[idx]

    def _slots(self, lo: int, hi: int) -> slice | torch.Tensor:
        """Pool slots of cache tokens [lo, hi): a slice when they are consecutive there, else an index tensor."""
        parts: list[tuple[int, int]] = []
        at = 0
        for s, n in self._spans():
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                parts.append((s + a - at, s + b - at))
            at += n
        if len(parts) <= 1:
            a, b = parts[0] if parts else (0, 0)
            return slice(a, b)
        return torch.cat([torch.arange(a, b, device=self.pool.device) for a, b in parts])

    def _slot_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Pool slots of the cache tokens at ``idx`` ((M,) int64 in ``[0, n)``)."""
        if not self.shared:
            return idx + self._own0()
        dev = self.pool.device
        starts = torch.tensor([s for s, _ in self._spans()], dtype=torch.int64, device=dev)
        offsets = torch.tensor([0] + [n for _, n in self._spans()], dtype=torch.int64, device=dev).cumsum(0)
        part = torch.searchsorted(offsets[1:], idx, right=True)
        return starts[part] + idx - offsets[part]

    def segments(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The cache as its stored parts, in order: [(k, v (Hkv, n_i, D), positions (n_i,))], views for plain pages.

        Attention reads these in place (``longkv.attention.dense.attend_segments``)
        instead of concatenating a shared prefix with the sequence's own tokens.
        """
        return [self._part(s, n) for s, n in self._runs()]

    def decode_parts(self) -> list[tuple[torch.Tensor | CodedRows, torch.Tensor | CodedRows, torch.Tensor]]:
        """:meth:`segments` as a decode step's attention reads them: int8 pages as ``(rows, rows, positions)``
        with ``rows`` a :class:`~longkv.kv.quant.CodedRows` (their planes, read as codes by
        :func:`longkv.kernels.decode_attention`: 56 % of bfloat16's bytes for head_dim 64), other formats as
        :meth:`segments` gives them."""
        if not self._coded_reads:
            return list(self.segments())
        planes, pos, fmt = self.pool.planes, self.pool.pos, self.pool.fmt
        assert isinstance(fmt, CodedFormat)
        out: list[tuple[torch.Tensor | CodedRows, torch.Tensor | CodedRows, torch.Tensor]] = []
        for s, n in self._runs():
            rows = CodedRows(fmt, {name: t[:, s : s + n] for name, t in planes.items()})
            out.append((rows, rows, pos[s : s + n]))
        return out

    def kernel_reads(self, dtype: torch.dtype) -> bool:
        """Whether a decode step's kernel may read and write this cache in its pool's planes (:meth:`kernel_runs`
        is not None): pages as computed, of ``dtype``, or int8 codes for a cache of ``dtype``."""
        return (self._plain and self.pool.planes["k"].dtype == dtype) or (self._coded_reads and self.dtype == dtype)

    def kernel_runs(self, dtype: torch.dtype, start: int = 0) -> list[tuple[int, int]] | None:
        """(first slot, tokens) of the cached tokens ``[start, n)`` as runs of consecutive slots, in order,
        where a decode step's kernel may read and write this cache straight in its pool's planes (pages as
        computed, of ``dtype``, or int8 codes for a cache of ``dtype``; on the CPU with the kernels built); else
        None (int4 codes, another dtype; stores that keep pages elsewhere: see :meth:`kernel_reads`)."""
        if not self.kernel_reads(dtype):
            return None
        out: list[tuple[int, int]] = []
        at = 0
        for s, n in self._runs():
            skip = min(max(start - at, 0), n)
            if n > skip:
                out.append((s + skip, n - skip))
            at += n
        return out

    def _runs(self) -> list[tuple[int, int]]:
        """(first slot, tokens) of the parts :meth:`segments` returns (the own run even when empty)."""
        return [(self._own0(), self.n_own)] if not self.shared else self._spans()

    def _part(self, s: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v, pos = self._decode(slice(s, s + n))
        assert v is not None
        return k, v, pos

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All cached tokens: k, v: (Hkv, n, D); positions: (n,). Zero-copy for plain pages in one part."""
        k, v, pos = self.read(0, self.n)
        assert v is not None
        return k, v, pos

    def read(self, lo: int, hi: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Tokens [lo, hi) of the cache: k, v (Hkv, hi - lo, D) and positions (zero-copy for plain pages in one part).

        ``values=False`` returns None for v (scoring reads keys only; a tiered
        store then skips loading them). ``0 <= lo <= hi <= n``.
        """
        return self._decode(self._slots(lo, hi), values)

    def positions(self) -> torch.Tensor:
        """(n,) int64: the original position of every cached token."""
        return self.pool.pos[self._slots(0, self.n)]

    def gather_pages(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy out the tokens of the given pages, in the order given.

        page_ids: (P,) int64 in ``[0, n_pages)``. Returns k, v: (Hkv, <= P * page_size, D)
        and positions (the last page may be partly filled).
        """
        idx = (page_ids[:, None] * self.page_size + torch.arange(self.page_size, device=page_ids.device)[None, :]).reshape(-1)
        idx = idx[idx < self.n]
        k, v, pos = self._decode(self._slot_index(idx))
        assert v is not None
        return k, v, pos

    # ---------------------------------------------------------------- edits
    def attach(self, pool: PagePool, slot0: int, n: int) -> None:
        """Read ``n`` tokens at ``pool``'s slots [slot0, slot0 + n) as the next cached tokens, without copying.

        Their pages are retained until this layer lets go. Tokens from another pool,
        or after tokens of the layer's own (shared spans come first), are copied in.
        """
        if n <= 0:
            return
        if pool is not self.pool or self.n_own:  # shared spans only come first
            self.copy_in(pool, slot0, n)
            return
        pool.retain_slots(slot0, n)
        if self.shared and sum(self.shared[-1]) == slot0:  # continues the last span (a split node): one part
            s0, m = self.shared[-1]
            first = slot0 // self.page_size
            if slot0 % self.page_size:  # the page at the seam is now referenced once for the joined span
                pool.release(first, 1)
            self.shared[-1] = (s0, m + n)
        else:
            self.shared.append((slot0, n))
        self.shared_n += n

    def copy_in(self, pool: PagePool, slot0: int, n: int) -> None:
        """Append a copy of the ``n`` tokens at ``pool``'s slots [slot0, slot0 + n) (any pool of this format)."""
        planes = {name: t[:, slot0 : slot0 + n] for name, t in pool.planes.items()}
        if pool.fmt == self.pool.fmt:
            if self.n + n > self.capacity:
                self._resize(self.shared_n + max(self.n_own + n, 2 * self.run_pages * self.page_size))
            dst = slice(self._own0() + self.n_own, self._own0() + self.n_own + n)
            for name, t in planes.items():
                self.pool.planes[name][:, dst] = t
            self.pool.pos[dst] = pool.pos[slot0 : slot0 + n]
            self.n_own += n
            return
        k, v = pool.fmt.decode(planes)
        assert v is not None
        self.append(k, v, pool.pos[slot0 : slot0 + n])

    def fork(self) -> LayerKV:
        """A second cache with the same tokens, sharing every page (no copy).

        Either side may then append, evict or truncate: a write to a page the
        other still reads goes to fresh pages first (copy on write).
        """
        other = LayerKV(self.n_kv_heads, self.pool.fmt.head_dim, self.page_size, self.dtype, codec=self.codec, pool=self.pool)
        for s, n in self._spans():
            other.attach(self.pool, s, n)
        other.acc = None if self.acc is None else self.acc.clone()
        return other

    def spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Where cache tokens [lo, hi) sit in the pool: [(first slot, tokens)], in order (nothing retained)."""
        out, at = [], 0
        for s, n in self._spans():
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                out.append((s + a - at, b - a))
            at += n
        return out

    def _unshare(self) -> None:
        """Copy every token into an own run and let go of the shared spans (before a write over them)."""
        if not self.shared:
            return
        k, v, pos = self.view()
        k, v, pos = k.clone(), v.clone(), pos.clone()
        old_run = (self.run_start, self.run_pages)
        for s, n in self.shared:
            self.pool.release_slots(s, n)
        self.shared, self.shared_n, self.n_own, self.run_pages = [], 0, 0, 0
        if old_run[1]:
            self.pool.release(*old_run)
        acc = self.acc
        self.append(k, v, pos)
        self.acc = acc

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at ``indices`` (sorted, unique, int64 in ``[0, n)``); free the rest.

        Survivors are packed to the front in the same order. Pages go back to the
        pool when the run would be over twice the size needed, so evicted tokens
        really give their memory back.
        """
        m = indices.numel()
        assert m <= self.n
        if m == self.n:
            return
        self._unshare()
        if self._run_shared():
            self._move_run(self.run_pages)
        src = indices + self._own0()
        dst = slice(self._own0(), self._own0() + m)
        for t in self.pool.planes.values():
            t[:, dst] = t[:, src]
        self.pool.pos[dst] = self.pool.pos[src]
        if self.acc is not None:
            self.acc = self.acc[:, indices[indices < self.acc.shape[1]]].contiguous()
        self.n_own = m
        if self.capacity > 2 * _round_up(max(m, 1), self.page_size):
            self._resize(m)

    def drop_pages(self, page_ids: torch.Tensor) -> None:
        """Free whole pages (page_ids: (P,) int64); the remaining tokens are repacked."""
        mask = torch.ones(self.n, dtype=torch.bool, device=self.pool.device)
        for p in page_ids.tolist():
            mask[p * self.page_size : (p + 1) * self.page_size] = False
        self.keep(mask.nonzero().squeeze(1))

    def truncate(self, n: int) -> None:
        """Forget every token from index ``n`` on (own pages are kept for reuse). ``0 <= n <= self.n``."""
        assert 0 <= n <= self.n
        if n >= self.shared_n:
            self.n_own = n - self.shared_n
            return
        self.n_own = 0
        kept, at = [], 0
        for s, k in self.shared:
            take = min(k, max(n - at, 0))
            if take:
                kept.append((s, take))
                self.pool.retain_slots(s, take)
            self.pool.release_slots(s, k)
            at += k
        self.shared, self.shared_n = kept, n

    def clear(self) -> None:
        """Drop every token and give every page back."""
        for s, n in self.shared:
            self.pool.release_slots(s, n)
        self.shared, self.shared_n, self.n_own = [], 0, 0
        self.acc = None
        self._set_run(0)

    def remap(self, kept: torch.Tensor, rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Keep the tokens whose position is in ``kept`` and move each to its rank there (a span cut out).

        kept: (M,) int64, sorted, unique original positions. A token at position
        ``kept[j]`` ends at position ``j``: its key is rotated by ``j - kept[j]``
        (``rotate(keys (Hkv, T, D), deltas (T,))``; rotations compose, so the key is
        the one computed at ``j``, up to rounding), its value is unchanged. Tokens
        whose position is not in ``kept`` are freed. Works for any page format
        (coded keys are decoded, rotated and coded again).
        """
        pos = self.positions()
        new = torch.searchsorted(kept, pos)
        hit = new < kept.numel()
        stay = hit & (kept[new.clamp_max(max(kept.numel() - 1, 0))] == pos) if kept.numel() else torch.zeros_like(hit)
        changed = (~stay | (new != pos)).nonzero()
        if not changed.numel():
            return
        f = int(changed[0, 0])  # tokens before it neither go nor move: left as they are
        tail = stay[f:].nonzero().squeeze(1) + f
        if not tail.numel():
            self.truncate(f)
            return
        k, v, _ = self.read(f, self.n)
        assert v is not None
        sel = tail - f
        keys, values = k[:, sel], v[:, sel]  # copies: the slots are written over next
        moved = rotate(keys.float(), new[tail] - pos[tail]).to(keys.dtype)
        self.truncate(f)
        self.append(moved, values, new[tail])

    def shrink(self) -> None:
        """Give back the own run's pages past the last cached token (after cutting tokens out)."""
        if self.capacity - self.n >= self.page_size:
            self._resize(self.n)

    def export(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every cached token as stored: each plane (Hkv, n, ...) and the positions (n,), contiguous copies.

        What :meth:`load` takes back bit for bit (a session snapshot).
        """
        idx = self._slots(0, self.n)
        return {name: t[:, idx].contiguous() for name, t in self.pool.planes.items()}, self.pool.pos[idx].clone()

    def load(self, planes: dict[str, torch.Tensor], positions: torch.Tensor) -> None:
        """Append tokens given as stored (see :meth:`export`): planes of this layer's format, (Hkv, T, ...) each.

        Raises:
            LongKVError: the planes' names, shapes or dtypes are not this layer's format.
        """
        want = self.pool.fmt.planes()
        t = positions.shape[0]
        if set(planes) != set(want) or any(
            tuple(planes[n].shape) != (self.n_kv_heads, t, *shape) or planes[n].dtype != dt for n, (shape, dt) in want.items()
        ):
            got = {n: (tuple(x.shape), str(x.dtype)) for n, x in planes.items()}
            raise LongKVError(f"saved KV does not fit this layer ({self.n_kv_heads} KV heads, {self.codec} pages): got {got}")
        if t:
            if self.pool.multi_ref_pages and self._writes_shared(t):
                self._cow()
            if self.n + t > self.capacity:
                self._resize(self.n + t)
            dst = slice(self._own0() + self.n_own, self._own0() + self.n_own + t)
            dev = self.pool.device
            for name, x in planes.items():
                self.pool.planes[name][:, dst] = x.to(dev)
            self.pool.pos[dst] = positions.to(dev)
            self.n_own += t

    def mark(self) -> object:
        """A point to :meth:`rollback` to: tokens appended after it can be forgotten."""
        return self.n

    def rollback(self, mark: object) -> None:
        """Forget every token appended since :meth:`mark` (nothing may have been evicted since)."""
        assert isinstance(mark, int)
        self.truncate(mark)


class KVCache:
    """One :class:`LayerKV` per decoder layer.

    Args:
        n_layers, n_kv_heads, head_dim: model shape.
        page_size: tokens per page.
        dtype: storage dtype of K and V.
        make_layer: builds layer ``i``'s store instead of a plain :class:`LayerKV`
            with a pool of its own (the engine's pools, coded pages, per-head); see
            ``KVPolicy.new_layer_kv``.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        page_size: int = 64,
        dtype: torch.dtype = torch.float32,
        make_layer: Callable[[int], LayerKV] | None = None,
    ) -> None:
        if make_layer is None:
            self.layers = [LayerKV(n_kv_heads, head_dim, page_size, dtype) for _ in range(n_layers)]
        else:
            self.layers = [make_layer(i) for i in range(n_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def bytes(self) -> int:
        """Bytes allocated over all layers."""
        return sum(layer.bytes() for layer in self.layers)

    def used_bytes(self) -> int:
        """Bytes of the valid tokens over all layers."""
        return sum(layer.used_bytes() for layer in self.layers)

    def tokens(self) -> list[int]:
        """Cached tokens per layer."""
        return [layer.n for layer in self.layers]

    def reserve(self, n_tokens: int) -> None:
        """Reserve ``n_tokens`` in every layer."""
        for layer in self.layers:
            layer.reserve(n_tokens)

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` of every layer (see :meth:`LayerKV.truncate`)."""
        for layer in self.layers:
            layer.truncate(min(n_tokens, layer.n))

    def marks(self) -> list[object]:
        """Every layer's :meth:`LayerKV.mark` (to undo a forward cut short)."""
        return [layer.mark() for layer in self.layers]

    def rollback(self, marks: list[object]) -> None:
        """Forget what every layer appended since :meth:`marks`."""
        for layer, m in zip(self.layers, marks, strict=True):
            layer.rollback(m)

    def fork(self) -> KVCache:
        """A copy-on-write twin of this cache: every layer's pages shared (see :meth:`LayerKV.fork`)."""
        twin = object.__new__(KVCache)
        twin.layers = [layer.fork() for layer in self.layers]
        return twin

    def clear(self) -> None:
        """Free every layer."""
        for layer in self.layers:
            layer.clear()
