"""Dense attention over the cached keys: ``torch.nn.functional.scaled_dot_product_attention``.

Causality is decided by original positions (a key is visible to a query iff
its original position is not later), so it stays right after any eviction,
whatever positions RoPE was given at attention time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from longkv import kernels
from longkv.config import fast_bf16_matmul
from longkv.kv.quant import Part, decoded


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
    pad: bool = True,
) -> torch.Tensor:
    """Grouped-query attention of T queries over N cached keys.

    Args:
        q: (H, T, D) rotated queries.
        k, v: (Hkv, N, D) cached keys (rotated) and values; H is a multiple of Hkv (GQA).
        q_pos: (T,) original positions of the queries.
        k_pos: (N,) original positions of the keys, increasing; the queries' own
            keys are the last T.
        window: sliding-window attention: a query at position p sees keys at
            ``p - window < k_pos <= p`` only (``None``: every earlier key).
        pad: on the CPU, pad a chunk to fixed blocks (:func:`_padded`), so that a query's output is the
            same bits whatever chunk it comes in (KV a prefix cache may share); False: a chunk whose keys
            are chosen per chunk (block_topk's pages) skips that cost.

    Returns:
        (H, T, D) attention output in q's dtype.
    """
    t, n = q.shape[1], k.shape[1]
    if t == 1:
        if window is not None and n > window:  # keys are in position order: the window is a tail
            first = int(torch.searchsorted(k_pos, q_pos[0] - window, right=True))
            k, v = k[:, first:], v[:, first:]
        return _decode_attend(q, k, v)
    gqa = q.shape[0] != k.shape[0]
    if pad and q.device.type == "cpu":
        q, q_pos, k, v, k_pos = _padded(q, q_pos, k, v, k_pos)
    elif n == t and (window is None or n <= window):  # a first chunk: plain causal
        return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=gqa).squeeze(0)
    mask = k_pos[None, :] <= q_pos[:, None]  # (T, N) bool
    if window is not None and n > window:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, enable_gqa=gqa)
    return out.squeeze(0)[:, :t]


Q_ROWS, K_ROWS = 64, 512  # a prompt chunk's queries and keys are padded to multiples of these on the CPU


def _padded(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries padded to a multiple of :data:`Q_ROWS` rows (copies of the last) and the keys and values to
    a multiple of :data:`K_ROWS` (zeros at a position no query sees): PyTorch's CPU attention then cuts every
    chunk into the same blocks, so a query's output does not depend on how many queries and keys share its
    chunk (the same bits for a prompt computed in one chunk or resumed after cached tokens). Masked keys add
    exact zeros."""
    t, n = q.shape[1], k.shape[1]
    tp, np_ = -(-t // Q_ROWS) * Q_ROWS, -(-n // K_ROWS) * K_ROWS
    if tp != t:
        q = torch.cat((q, q[:, -1:].expand(-1, tp - t, -1)), dim=1)
        q_pos = torch.cat((q_pos, q_pos[-1:].expand(tp - t)))
    if np_ != n:
        k = torch.cat((k, k.new_zeros(k.shape[0], np_ - n, k.shape[2])), dim=1)
        v = torch.cat((v, v.new_zeros(v.shape[0], np_ - n, v.shape[2])), dim=1)
        k_pos = torch.cat((k_pos, k_pos.new_full((np_ - n,), torch.iinfo(k_pos.dtype).max)))
    return q, q_pos, k, v, k_pos


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per head over every cached key (decode): two batched matmuls.

    On the CPU, :func:`longkv.kernels.decode_attention` where it is built (3-6x faster than
    the PyTorch ops below from 512 to 8 K keys). Otherwise, for a single query the CPU flash
    kernel of SDPA costs more than the math; grouping the H query heads by KV head makes this
    two bmm calls of shape (Hkv, G, D) x (Hkv, D, N). Softmax in float32. q: (H, 1, D); k, v: (Hkv, N, D).
    Where bfloat16 products are slow (:func:`~longkv.config.fast_bf16_matmul`), K and
    V are up-cast first and the products run in float32 (4-5x faster there).
    """
    h, _, d = q.shape
    hkv = k.shape[0]
    if kernels.supports(q, k):  # on the CPU: one C call reading the pages in place
        return kernels.decode_attention(q, [[(k, v)]], d**-0.5)
    if k.dtype == torch.bfloat16 and not fast_bf16_matmul(k.device):
        return _decode_attend(q.float(), k.float(), v.float()).to(q.dtype)
    qg = q.reshape(hkv, h // hkv, d)  # (Hkv, G, D): heads of a group share K/V
    # k @ q^T keeps the cache view (strided over heads) as the untransposed operand,
    # which the CPU batched GEMM reads in place; q @ k^T would copy K every step.
    scores = torch.bmm(k, qg.transpose(1, 2)).transpose(1, 2).float().contiguous()  # (Hkv, G, N)
    probs = torch.softmax(scores * (d**-0.5), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).reshape(h, 1, d)


def in_window(segments: Sequence[Part], q_pos: torch.Tensor, window: int | None) -> list[Part]:
    """The parts of a cache one query at ``q_pos`` ((1,) int64) sees under a sliding ``window``: each part cut
    to its keys at positions ``> q_pos - window`` (views; parts left empty dropped). ``None``: all of them."""
    if window is None:
        return list(segments)
    lo = q_pos[-1] - window
    out: list[Part] = []
    for k, v, kpos in decoded(segments):
        if kpos.numel() == 0 or int(kpos[-1]) <= lo:
            continue
        first = int(torch.searchsorted(kpos, lo, right=True))
        out.append((k[:, first:], v[:, first:], kpos[first:]))
    return out


def attend_segments(
    q: torch.Tensor, segments: Sequence[Part], q_pos: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """:func:`attend` over keys stored in parts (a shared prefix's pages, then a sequence's own).

    Args:
        q: (H, T, D) rotated queries; q_pos: (T,) their original positions.
        segments: [(k, v (Hkv, N_i, D), k_pos (N_i,))] in cache order, the queries'
            own keys last (see ``LayerKV.segments``); k and v may be int8 pages as
            :class:`~longkv.kv.quant.CodedRows` (``LayerKV.decode_parts``): the decode
            kernel reads their codes, every other path decodes them first.

    A decode step reads every part in place: the scores of all parts are one
    softmax, the output the sum of each part's probabilities times its values.
    A multi-token query joins the parts first (prefill is compute-bound; the
    copy is small against its matmuls). ``window``: sliding-window attention (see
    :func:`attend`). Returns (H, T, D) in q's dtype.
    """
    if window is not None and q.shape[1] == 1:
        segments, window = in_window(segments, q_pos, window), None
    if q.shape[1] == 1 and segments and kernels.supports(q, segments[0][0]):  # a decode step: one C call over the parts
        return kernels.decode_attention(q, [[(k, v) for k, v, _ in segments]], q.shape[-1] ** -0.5)
    plain = decoded(segments)
    if len(plain) == 1:
        k, v, kpos = plain[0]
        return attend(q, k, v, q_pos, kpos, window)
    if q.shape[1] > 1:
        k, v, kpos = (torch.cat(parts, dim=d) for parts, d in zip(zip(*plain, strict=True), (1, 1, 0), strict=True))
        return attend(q, k, v, q_pos, kpos, window)
    h, _, d = q.shape
    hkv = plain[0][0].shape[0]
    if q.dtype == torch.bfloat16 and not fast_bf16_matmul(q.device):  # see _decode_attend
        up: list[Part] = [(k.float(), v.float(), kpos) for k, v, kpos in plain]
        return attend_segments(q.float(), up, q_pos).to(q.dtype)
    qg = q.reshape(hkv, h // hkv, d).transpose(1, 2)  # (Hkv, D, G)
    scores = torch.cat([torch.bmm(k, qg).transpose(1, 2).float() for k, _, _ in plain], dim=-1)  # (Hkv, G, N)
    probs = torch.softmax(scores * (d**-0.5), dim=-1)
    out = None
    at = 0
    for _, v, _ in plain:
        n = v.shape[1]
        part = torch.bmm(probs[:, :, at : at + n].to(v.dtype), v)
        out = part if out is None else out + part
        at += n
    assert out is not None
    return out.reshape(h, 1, d)


def attend_decode_batch(q: torch.Tensor, plans: Sequence[Sequence[Part]]) -> torch.Tensor:
    """Decode attention of B sequences at once, each one query per head over its own cached parts.

    Args:
        q: (H, B, D) the new token's rotated queries, column b for sequence b.
        plans: per sequence, its cache's parts in order as attention reads them:
            [(k, v (Hkv, N_i, D) or int8 CodedRows, k_pos (N_i,))] (``Runner.reader``); lengths differ.

    On the CPU with :mod:`longkv.kernels` built, the whole batch is one C call reading
    every sequence's parts in place (no packing). Otherwise the ragged caches are packed into one (B, Hkv, N_max, D) buffer each for keys
    and values (one copy per part, which is also the up-cast to float32 where
    bfloat16 products are slow, see :func:`~longkv.config.fast_bf16_matmul`); the
    scores, the padding mask, the softmax (float32) and the product with the values
    are then one batched op each for the whole batch, whatever B is.
    Returns (H, B, D) in q's dtype; column b equals :func:`attend_segments` of
    sequence b alone up to float rounding.
    """
    h, b, d = q.shape
    k0 = plans[0][0][0]
    hkv = k0.shape[0]
    if kernels.supports(q[:, :1], k0):  # every sequence's parts read in place, one C call for the batch
        return kernels.decode_attention(q, [[(k, v) for k, v, _ in parts] for parts in plans], d**-0.5)
    dplans = [decoded(parts) for parts in plans]
    k0 = dplans[0][0][0]
    lens = [sum(k.shape[1] for k, _, _ in parts) for parts in dplans]
    nmax = max(lens)
    dt = torch.float32 if k0.dtype == torch.bfloat16 and not fast_bf16_matmul(k0.device) else k0.dtype
    kb = torch.empty(b, hkv, nmax, d, dtype=dt, device=q.device)
    vb = torch.empty(b, hkv, nmax, d, dtype=dt, device=q.device)
    for i, parts in enumerate(dplans):
        at = 0
        for k, v, _ in parts:
            n = k.shape[1]
            kb[i, :, at : at + n] = k
            vb[i, :, at : at + n] = v
            at += n
        if at < nmax:  # padding: its probabilities are 0, its values must not be NaN
            vb[i, :, at:] = 0
    qg = q.transpose(0, 1).reshape(b, hkv, h // hkv, d).to(dt)  # (B, Hkv, G, D): heads of a group share K/V
    scores = torch.matmul(qg, kb.transpose(-1, -2)).float()  # (B, Hkv, G, N_max)
    if min(lens) < nmax:
        pad = torch.arange(nmax, device=q.device)[None, :] >= torch.tensor(lens, device=q.device)[:, None]  # (B, N_max)
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores * (d**-0.5), dim=-1).to(dt)
    out = torch.matmul(probs, vb)  # (B, Hkv, G, D)
    return out.reshape(b, h, d).transpose(0, 1).to(q.dtype)
