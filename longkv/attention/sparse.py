"""Block-sparse attention over chosen pages, with in-window positions (context extension).

A query block (a prefill chunk or one decode token) attends to three groups of
cached tokens, all whole pages of ``page_size`` tokens:

* the **sink pages**: the first ``sink_tokens`` tokens (StreamingLLM, Xiao et al. 2023);
* the **top-k pages** chosen by a selection policy (block top-k: MoBA, Lu et al.
  2025; Quest, Tang et al. 2024);
* the **local window**: every token from ``window_start`` on, which covers at
  least ``window`` tokens before the block, plus the block itself.

Positions (InfLLM, Xiao et al. 2024): the attended tokens are laid out in their
original order and seen at consecutive positions ending at the newest token's
true position. So the local window keeps its true distances, retrieved pages
sit just beyond it and the sink pages just beyond those; the longest distance a
query sees is ``sink_tokens + k * page_size + window + page_size + block``, inside
the trained window whatever the input length. Keys are cached rotated at their
original position, so moving them is one rotation by the position delta.

When the window reaches back to the sink pages nothing is left out: attention
is the dense kernel on the cache as it is (the dense fallback for short inputs).
"""

from __future__ import annotations

import torch

from longkv.attention.dense import attend
from longkv.kv.cache import LayerKV
from longkv.kv.summaries import PageSummaries
from longkv.models.layers import Rotary

SCORES = ("lse", "max", "mean", "minmax")


def window_start(n_before: int, sink_tokens: int, window: int, page_size: int) -> int:
    """First cache index of the local window for a block that follows ``n_before`` cached tokens.

    Rounded down to a page boundary so that sink pages, candidate pages and the
    window tile the cache without gaps; never below ``sink_tokens``.
    """
    return max(sink_tokens, (n_before - window) // page_size * page_size)


def candidate_pages(n_before: int, sink_tokens: int, window: int, page_size: int, device: torch.device) -> torch.Tensor:
    """(C,) int64 ids (on ``device``) of the pages a block may retrieve: every page between the sinks and the window."""
    w0 = window_start(n_before, sink_tokens, window, page_size)
    return torch.arange(sink_tokens // page_size, w0 // page_size, dtype=torch.int64, device=device)


def layout(n: int, w0: int, sink_tokens: int, page_size: int, pages: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Cache indices a block attends to, in original order: sinks, selected pages, window.

    Args:
        n: cached tokens (the block's own keys included).
        w0: first index of the local window (see :func:`window_start`).
        pages: (G, k) int64 page ids, sorted, inside ``[sink_tokens / page_size, w0 / page_size)``;
            G is 1 (one selection for every KV head) or Hkv. ``None``: no pages.

    Returns:
        (G, M) int64 indices on ``device``, M = sink_tokens + k * page_size + (n - w0).
    """
    sinks = torch.arange(sink_tokens, dtype=torch.int64, device=device)
    win = torch.arange(w0, n, dtype=torch.int64, device=device)
    if pages is None or pages.numel() == 0:
        return torch.cat((sinks, win))[None]
    g = pages.shape[0]
    toks = (pages[:, :, None] * page_size + torch.arange(page_size, device=device)).flatten(1)  # (G, k * ps)
    return torch.cat((sinks.expand(g, -1), toks, win.expand(g, -1)), dim=1)


def assigned_positions(last_position: int, m: int, device: torch.device) -> torch.Tensor:
    """(M,) consecutive positions on ``device`` ending at ``last_position``: where the M attended keys are seen."""
    return last_position - torch.arange(m - 1, -1, -1, dtype=torch.int64, device=device)


def attend_pages(
    q: torch.Tensor,
    lkv: LayerKV,
    q_pos: torch.Tensor,
    rope: Rotary,
    sink_tokens: int,
    window: int,
    pages: torch.Tensor | None,
    w0: int | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of a block of T queries over sink pages + selected pages + local window.

    Args:
        q: (H, T, D) queries rotated at their true positions ``q_pos`` (T,) int64.
        lkv: the layer's cache, the block's own T keys already appended.
        sink_tokens: multiple of the page size.
        window: local window in tokens (before the block).
        pages: (G, k) selected page ids (G = 1 or Hkv), or None.
        w0: first index of the local window (default: :func:`window_start`); a
            kept selection anchors it where the selection was made, so no page
            falls between the selected ones and the window while the answer grows.
        prefix: keys, values (Hkv, P, D) and original positions (P,) of the sink
            pages + selected pages re-encoded together, the keys rotated to the positions
            they are seen at, just before the window (``BlockTopKPolicy.seen_prefix``); used
            instead of the cached ones when given (see ``BlockTopKPolicy.reencode``).

    Returns:
        (H, T, D) in q's dtype. With ``pages`` covering every candidate page the
        result is dense attention exactly (same keys, true positions).
    """
    n, t, ps = lkv.n, q.shape[1], lkv.page_size
    if w0 is None:
        w0 = window_start(n - t, sink_tokens, window, ps)
    if w0 <= sink_tokens and (pages is None or pages.numel() == 0):
        k, v, kpos = lkv.read(0, n)
        assert v is not None
        return attend(q, k, v, q_pos, kpos, pad=False)  # nothing is left out: dense fallback
    wk, wv, wpos = lkv.read(w0, n)  # the local window (hot in a tiered store)
    assert wv is not None
    last = int(wpos[-1])
    if prefix is not None:
        pk, pv, ppos = prefix
        return attend(q, torch.cat((pk, wk), dim=1), torch.cat((pv, wv), dim=1), q_pos, torch.cat((ppos, wpos)), pad=False)
    if pages is not None and pages.shape[0] > 1:
        return _attend_per_head(q, lkv, q_pos, rope, sink_tokens, pages, w0)
    sk, sv, spos = lkv.read(0, sink_tokens)
    assert sv is not None
    parts_k, parts_v, parts_p = [sk], [sv], [spos]
    if pages is not None and pages.numel():
        pk, pv, ppos = lkv.gather_pages(pages[0])
        parts_k.append(pk)
        parts_v.append(pv)
        parts_p.append(ppos)
    moved = sum(p.numel() for p in parts_p)  # sinks + pages; the window keeps its true positions
    orig = torch.cat(parts_p)
    m = moved + n - w0
    keys = torch.cat(parts_k, dim=1)
    delta = assigned_positions(last, m, orig.device)[:moved] - orig
    if bool(delta.any()):
        keys = rope.rotate(keys, delta)
    keys = torch.cat((keys, wk), dim=1)
    values = torch.cat((*parts_v, wv), dim=1)
    # Causality by original positions: pages and sinks precede every query.
    return attend(q, keys, values, q_pos, torch.cat((orig, wpos)), pad=False)


def _attend_per_head(
    q: torch.Tensor, lkv: LayerKV, q_pos: torch.Tensor, rope: Rotary, sink_tokens: int, pages: torch.Tensor, w0: int
) -> torch.Tensor:
    """:func:`attend_pages` with one page selection per KV head: pages (Hkv, k)."""
    k, v, kpos = lkv.view()
    n = lkv.n
    idx = layout(n, w0, sink_tokens, lkv.page_size, pages, k.device)  # (G, M)
    g, m = idx.shape
    gather = idx[:, :, None].expand(-1, -1, k.shape[2])
    keys, values, orig = torch.gather(k, 1, gather), torch.gather(v, 1, gather), kpos[idx]
    moved = m - (n - w0)
    if moved:
        delta = assigned_positions(int(kpos[-1]), m, kpos.device)[:moved] - orig[:, :moved]  # (G, moved)
        if bool(delta.any()):
            cos, sin = rope.cos_sin(delta.reshape(-1), keys.dtype)
            cos, sin = cos.view(g, moved, -1), sin.view(g, moved, -1)
            keys = torch.cat((Rotary.apply(keys[:, :moved], cos, sin), keys[:, moved:]), dim=1)
    return attend(q, keys, values, q_pos, orig[0], pad=False)


def page_scores(
    q: torch.Tensor,
    lkv: LayerKV,
    pages: torch.Tensor,
    assumed_position: int,
    rope: Rotary,
    score: str = "max",
    summaries: PageSummaries | None = None,
    block_pages: int = 256,
) -> torch.Tensor:
    """How much each page matters to a block of queries, as attention would see it.

    Every page is scored as if its first token sat at ``assumed_position`` (just
    beyond the local window, where a retrieved page will be placed), so RoPE
    is applied the way attention will apply it.

    Args:
        q: (H, T, D) queries rotated at their true positions.
        lkv: the layer's cache (keys rotated at their original positions).
        pages: (C,) int64 candidate page ids, increasing and contiguous.
        score: ``"lse"``: log-sum-exp of the page's scaled logits q.k / sqrt(D)
            (the log of the attention mass the page would get, up to the softmax
            normaliser); ``"max"``: exact maximum of q.k over the page's keys; ``"mean"``: q against the page's mean key (MoBA's gate);
            ``"minmax"``: Quest's upper bound from per-channel min/max.
        summaries: required for ``"mean"`` and ``"minmax"`` (full pages summarised).

    Returns:
        (Hkv, G * T, C) float32: for each KV head, each query of its group
        (G = H / Hkv query heads x T tokens, head-major) and each page, the
        logit before the 1/sqrt(D) scale (``"lse"``: after it).
    """
    h, t, d = q.shape
    hkv, ps = lkv.n_kv_heads, lkv.page_size
    c = pages.numel()
    if c == 0:
        return torch.empty(hkv, (h // hkv) * t, 0, device=q.device)
    qf = q.float().reshape(hkv, (h // hkv) * t, d)  # query heads grouped by KV head (GQA)
    if score in ("max", "lse"):
        first = int(pages[0])
        out = []
        for b in range(0, c, block_pages):  # bounded memory: (Hkv, G*T, block_pages * ps) floats
            lo, hi = (first + b) * ps, (first + min(b + block_pages, c)) * ps
            k, _, pos = lkv.read(lo, hi, values=False)  # a tiered store loads only these pages
            starts = pos[::ps].repeat_interleave(ps)
            keys = rope.rotate(k.float(), assumed_position - starts)  # each page moved to the assumed place
            s = torch.bmm(qf, keys.transpose(1, 2))  # (Hkv, G*T, m * ps)
            s = s.unflatten(2, (-1, ps))
            out.append(s.amax(dim=3) if score == "max" else torch.logsumexp(s * d**-0.5, dim=3))
        return torch.cat(out, dim=2)
    assert summaries is not None and score in SCORES, score
    # q . R(P) k_raw == (R(-P) q) . k_raw: rotate the queries once instead of every summary.
    qe = rope.rotate(qf, torch.full((qf.shape[1],), -assumed_position, dtype=torch.int64, device=q.device))
    if score == "mean":
        s = torch.bmm(qe, summaries.mean[:, pages].transpose(1, 2))
    else:
        s = torch.bmm(qe.clamp(min=0), summaries.kmax[:, pages].transpose(1, 2)) + torch.bmm(
            qe.clamp(max=0), summaries.kmin[:, pages].transpose(1, 2)
        )
    return s
