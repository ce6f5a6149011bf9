"""Dense attention over the cached keys: ``torch.nn.functional.scaled_dot_product_attention``.

Causality is decided by original positions (a key is visible to a query iff
its original position is not later), so it stays right after any eviction,
whatever positions RoPE was given at attention time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
) -> torch.Tensor:
    """Grouped-query attention of T queries over N cached keys.

    Args:
        q: (H, T, D) rotated queries.
        k, v: (Hkv, N, D) cached keys (rotated) and values; H is a multiple of Hkv (GQA).
        q_pos: (T,) original positions of the queries.
        k_pos: (N,) original positions of the keys, increasing; the queries' own
            keys are the last T.

    Returns:
        (H, T, D) attention output in q's dtype.
    """
    t, n = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if t == 1:
        return _decode_attend(q, k, v)
    if n == t:  # first chunk: plain causal
        mask = None
        causal = True
    else:
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, N) bool
        causal = False
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=causal, enable_gqa=gqa
    )
    return out.squeeze(0)


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per head over every cached key (decode): two batched matmuls.

    For a single query the CPU flash kernel of SDPA costs more than the math;
    grouping the H query heads by KV head makes this two bmm calls of shape
    (Hkv, G, D) x (Hkv, D, N). Softmax in float32. q: (H, 1, D); k, v: (Hkv, N, D).
    """
    h, _, d = q.shape
    hkv = k.shape[0]
    qg = q.reshape(hkv, h // hkv, d)  # (Hkv, G, D): heads of a group share K/V
    # k @ q^T keeps the cache view (strided over heads) as the untransposed operand,
    # which the CPU batched GEMM reads in place; q @ k^T would copy K every step.
    scores = torch.bmm(k, qg.transpose(1, 2)).transpose(1, 2).float().contiguous()  # (Hkv, G, N)
    probs = torch.softmax(scores * (d**-0.5), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).reshape(h, 1, d)


def attend_segments(
    q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], q_pos: torch.Tensor
) -> torch.Tensor:
    """:func:`attend` over keys stored in parts (a shared prefix's pages, then a sequence's own).

    Args:
        q: (H, T, D) rotated queries; q_pos: (T,) their original positions.
        segments: [(k, v (Hkv, N_i, D), k_pos (N_i,))] in cache order, the queries'
            own keys last (see ``LayerKV.segments``).

    A decode step reads every part in place: the scores of all parts are one
    softmax, the output the sum of each part's probabilities times its values.
    A multi-token query joins the parts first (prefill is compute-bound; the
    copy is small against its matmuls). Returns (H, T, D) in q's dtype.
    """
    if len(segments) == 1:
        k, v, kpos = segments[0]
        return attend(q, k, v, q_pos, kpos)
    if q.shape[1] > 1:
        k, v, kpos = (torch.cat(parts, dim=d) for parts, d in zip(zip(*segments, strict=True), (1, 1, 0), strict=True))
        return attend(q, k, v, q_pos, kpos)
    h, _, d = q.shape
    hkv = segments[0][0].shape[0]
    qg = q.reshape(hkv, h // hkv, d).transpose(1, 2)  # (Hkv, D, G)
    scores = torch.cat([torch.bmm(k, qg).transpose(1, 2).float() for k, _, _ in segments], dim=-1)  # (Hkv, G, N)
    probs = torch.softmax(scores * (d**-0.5), dim=-1)
    out = None
    at = 0
    for _, v, _ in segments:
        n = v.shape[1]
        part = torch.bmm(probs[:, :, at : at + n].to(v.dtype), v)
        out = part if out is None else out + part
        at += n
    assert out is not None
    return out.reshape(h, 1, d)
