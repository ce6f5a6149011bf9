"""The batched step: one forward of the model over the works of many sequences.

A :class:`Work` is one sequence's share of a step (a prompt chunk, a decode token, a
probe); :func:`run_batch` runs the forward over all of them: the decode tokens together
through the coded decode weights (one kernel call where every sequence's pages allow it),
every other work in a forward of its own, each sequence's attention under its own
policy. Runners (:mod:`longkv.engine.runner`) make the works; the step loop
(:mod:`longkv.engine.engine`) chooses which share a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from longkv import kernels
from longkv.attention.dense import attend_decode_batch
from longkv.kv.quant import CodedFormat
from longkv.models.llama import LlamaModel
from longkv.policies.base import SelectionPolicy

if TYPE_CHECKING:
    from longkv.engine.runner import Runner, Sequence

# (layer, q (H, T, D), k, v (Hkv, T, D), positions (T,)) -> attention output (H, T, D)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

@dataclass
class Work:
    """One sequence's share of a batched forward: ``ids`` fed after what ``seq`` holds.

    Attributes:
        runner: runs the sequence's policy (sequences of one batch may differ in policy).
        decode: one generated token (compression every ``evict_every`` steps) rather than a
            prompt chunk (compression after the chunk).
        logits: compute the logits after the last of ``ids``.
        compress: prompt chunks only: let the policy compress after it.
        keep: the tokens join the sequence; ``False``: a probe (``attention`` cuts its
            keys back, ``seq.tokens`` is not extended, nothing is compressed).
        attention: replaces the runner's attention for this work (a probe's read).
        then: called after the forward with this work's logits (V,) or None; the
            logits are then not returned by :func:`run_batch` (a need's work, see
            :mod:`longkv.engine.needs`).
    """

    runner: Runner
    seq: Sequence
    ids: list[int]
    decode: bool = False
    logits: bool = True
    compress: bool = True
    keep: bool = True
    attention: AttentionFn | None = None
    then: Callable[[torch.Tensor | None], None] | None = None


class Interrupted(Exception):
    """``should_stop()`` asked a batched forward to stop between two layers; every cache was rolled back."""


def run_batch(
    model: LlamaModel, works: list[Work], should_stop: Callable[[], bool] | None = None
) -> list[torch.Tensor | None]:
    """The forward of a step over the tokens of every work item (a ragged batch: no padding); logits (V,) or None each.

    The decode tokens share one forward through the coded decode weights, one kernel call where it
    can be (:func:`_one_call_decode`); every other work (a prompt chunk, a probe) runs through the
    weights themselves in a forward of its own. Every weight matrix is read once per forward;
    attention runs sequence by sequence over its own cache, under its own policy. Then each runner's
    :meth:`Runner.after_forward` (tokens, compression). A token's products do not depend on what
    shares its step or its chunk, so each sequence's logits are the same bits as alone (on the CPU
    with the kernels built; elsewhere equal up to float rounding).

    ``should_stop`` is asked before every layer's attention; when it says so, the KV
    appended by the layers already run is rolled back and :class:`Interrupted` raised
    (``seq.tokens`` is only extended once the forward has finished).

    Raises:
        ValueError: a sequence with two works in one batch.
    """
    assert works
    if len({id(w.seq) for w in works}) < len(works):
        raise ValueError("run_batch: a sequence has two works in one batch; its works run one step after another")
    coded = model.coded
    groups = [works] if not coded else [[w for w in works if w.decode]] + [[w] for w in works if not w.decode]
    marks = [w.seq.cache.marks() for w in works] if should_stop is not None else []
    logits: dict[int, torch.Tensor] = {}
    try:
        for group in groups:
            if not group:
                continue
            if coded and _one_call_decode(model, group):
                if should_stop is not None and should_stop():
                    raise Interrupted  # before this group touched a cache
                with torch.inference_mode():
                    out: torch.Tensor | None = _decode_step(model, group)
            else:
                out = _forward(model, group, should_stop, coded and group[0].decode)
            rows = [w for w in group if w.logits]
            if rows:
                assert out is not None
                logits.update((id(w), out[r]) for r, w in enumerate(rows))
    except Interrupted:
        for w, m in zip(works, marks, strict=True):
            w.seq.cache.rollback(m)
        raise
    with torch.inference_mode():
        for w in works:
            w.runner.after_forward(w)
    res: list[torch.Tensor | None] = []
    for w in works:
        lg = logits.get(id(w))
        if w.then is not None:
            with torch.inference_mode():
                w.then(lg)
            lg = None
        res.append(lg)
    return res


def _one_call_decode(model: LlamaModel, works: list[Work]) -> bool:
    """Whether this batch's forward can be one kernel call (``LlamaModel.decode_step``): every work one
    decode token, with logits, of a sequence whose policy attends over its pages in place (keys it
    renumbers turn inside the kernel, queries it keeps come back from it; no per-head stores; a selection policy
    where its read is parts read in place, ``SelectionPolicy.reads_in_place``), every layer's pages plain ones or int8 codes in the pool's planes
    (``LayerKV.kernel_reads``)."""
    if model.decode_layers is None:
        return False
    for w in works:
        pol = w.runner.policy
        if len(w.ids) != 1 or w.attention is not None or not w.logits or not w.keep or w.runner.sliding_layers:
            return False
        if pol.per_head:
            return False
        layers = w.seq.cache.layers
        if not all(lkv.kernel_reads(model.dtype) for lkv in layers):
            return False
        if isinstance(pol, SelectionPolicy) and not all(pol.reads_in_place(w.seq.selection, i, lkv) for i, lkv in enumerate(layers)):
            return False
    return True


def _decode_step(model: LlamaModel, works: list[Work]) -> torch.Tensor:
    """The forward of a decode batch in one kernel call: a slot claimed in every layer of every sequence
    for its new token (all first: a claim may grow a shared pool's planes), then the kernel's view of each
    cache; logits (B, V)."""
    claimed = [[w.seq.cache[layer].claim(1) for w in works] for layer in range(model.config.n_layers)]
    kv: list[int] = []
    meta: list[int] = []
    nseg: list[int] = []
    for layer, slots in enumerate(claimed):
        for w, slot in zip(works, slots, strict=True):
            lkv = w.seq.cache[layer]
            pool = lkv.pool
            planes, fmt = pool.planes, pool.fmt
            bits, group = (fmt.bits, fmt.group) if isinstance(fmt, CodedFormat) else (0, 0)
            kv += kernels.kv_words(planes, pool.pos, slot, bits, group)
            pol, start = w.runner.policy, 0
            parts: list[tuple[torch.Tensor, torch.Tensor]] = []
            if isinstance(pol, SelectionPolicy):  # e.g. block_topk's re-encoded pages, then its window
                parts, start = pol.in_place_parts(w.seq.selection, layer, lkv, w.runner.ropes[layer], w.seq.next_position)
            runs = lkv.kernel_runs(model.dtype, start)
            assert runs is not None
            nseg.append(len(parts) + len(runs))
            for pk, pv in parts:
                meta += kernels.segment(pk, pv)
            # keys renumbered (KVPolicy.key_positions): the cache's i-th key is seen at next_position - (n - 1) + i
            seen = pool.pos if pol.moves_keys else None
            at = w.seq.next_position - (lkv.n - 1) + start
            for s, n in runs:
                if bits:
                    meta += kernels.coded_segment(planes, s, n, group, seen, at)
                else:
                    meta += kernels.plain_segment(planes["k"], planes["v"], s, n, seen, at)
                at += n
    dev = model.device
    ids = torch.tensor([w.ids[0] for w in works], dtype=torch.int64, device=dev)
    positions = torch.tensor([w.seq.next_position for w in works], dtype=torch.int64, device=dev)
    keeps = [b for b, w in enumerate(works) if w.runner.policy.needs_queries]
    c = model.config
    q_out = torch.empty(c.n_layers, len(works), c.n_heads, c.head_dim, dtype=model.dtype, device=dev) if keeps else None
    logits = model.decode_step(ids, positions, kv, meta, nseg, q_out)
    for b in keeps:  # what the layer-by-layer step's reads keep (Runner.keep_queries)
        assert q_out is not None
        w = works[b]
        for layer in range(c.n_layers):
            w.runner.keep_queries(w.seq, layer, q_out[layer, b][:, None])
    return logits


def _forward(model: LlamaModel, works: list[Work], should_stop: Callable[[], bool] | None, coded: bool) -> torch.Tensor | None:
    """The forward of a batch layer by layer, each sequence's attention under its own policy, every product by
    the coded decode weights or not (``coded``); logits (R, V) of the works that want them, or None."""
    # Decoding sequences whose policy hands out read plans attend together (one batched
    # product per layer); the rest (prompt chunks, probes, selection policies) one by one.
    readers = [w.runner.reader(w.seq) if len(w.ids) == 1 and w.attention is None else None for w in works]
    if sum(r is not None for r in readers) < 2:
        readers = [None] * len(works)
    fns = [None if r is not None else (w.attention or w.runner.attention(w.seq)) for w, r in zip(works, readers, strict=True)]
    sizes = [len(w.ids) for w in works]
    offsets = list(accumulate(sizes, initial=0))
    batched = [i for i, r in enumerate(readers) if r is not None]
    only_decode = len(batched) == len(works)  # every row a decoding sequence's: the batch's output is the whole output
    batch_rows = torch.tensor([offsets[i] for i in batched], dtype=torch.int64, device=model.device) if batched and not only_decode else None

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if should_stop is not None and should_stop():
            raise Interrupted
        if len(fns) == 1 and fns[0] is not None:
            return fns[0](layer, q, k, v, pos)
        outs: list[torch.Tensor | None] = [None] * len(works)
        plans = []
        for i in batched:
            o = offsets[i]
            read = readers[i]
            assert read is not None
            plans.append(read(layer, q[:, o : o + 1], k[:, o : o + 1], v[:, o : o + 1], pos[o : o + 1]))
        if only_decode:
            return attend_decode_batch(q, plans)  # (H, B, D): row i is sequence i's
        if plans:
            assert batch_rows is not None
            out = attend_decode_batch(q.index_select(1, batch_rows), plans)  # (H, B, D)
            for j, i in enumerate(batched):
                outs[i] = out[:, j : j + 1]
        for i, fn in enumerate(fns):
            if fn is not None:
                o, n = offsets[i], sizes[i]
                outs[i] = fn(layer, q[:, o : o + n], k[:, o : o + n], v[:, o : o + n], pos[o : o + n])
        return torch.cat(outs, dim=1)  # type: ignore[arg-type]

    dev = model.device
    positions = torch.tensor([p for w in works for p in range(w.seq.next_position, w.seq.next_position + len(w.ids))], dtype=torch.int64, device=dev)
    ends = list(accumulate(sizes))
    rows = [e - 1 for e, w in zip(ends, works, strict=True) if w.logits]
    ids = torch.tensor([t for w in works for t in w.ids], dtype=torch.int64, device=dev)
    logits_at: torch.Tensor | str = torch.tensor(rows, dtype=torch.int64, device=dev) if rows else "none"
    with torch.inference_mode():
        return model.forward(ids, positions, attention, logits_at, coded)  # type: ignore[arg-type]
