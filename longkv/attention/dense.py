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
    if t == 1:  # decode: the only query is the newest token and sees every cached key
        mask = None
        causal = False
    elif n == t:  # first chunk: plain causal
        mask = None
        causal = True
    else:
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, N) bool
        causal = False
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=causal, enable_gqa=gqa
    )
    return out.squeeze(0)
