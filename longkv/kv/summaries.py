"""Page summaries: a few vectors per KV page that stand in for its keys when ranking pages.

For each full page of a layer and each KV head we keep, in float32:

* the mean key (the gate of MoBA, Lu et al. 2025);
* the per-channel minimum and maximum of the keys (the upper bound of Quest,
  Tang et al. 2024): for any query ``q``, ``sum_c max(q_c * min_c, q_c * max_c)``
  is at least ``q . k`` for every key ``k`` of the page.

The cache holds keys already rotated by RoPE at their original position. A
summary of rotated keys would mix many rotations, so the summaries are taken
over **position-free** keys (rotated back by their own position). A scorer then
rotates the query once to the position it wants the page to have (see
``longkv.attention.sparse.page_scores``), which makes the scores RoPE-consistent:
they are the logits attention would compute if every token of the page sat at
that position.

Only full pages are summarised; the partial last page is never a candidate
(it is inside the local window).
"""

from __future__ import annotations

import torch

from longkv.kv.cache import LayerKV
from longkv.models.layers import Rotary


class PageSummaries:
    """Mean / min / max of the position-free keys of each full page of one layer.

    Attributes:
        mean, kmin, kmax: (Hkv, P, D) float32 on the cache's device, P = pages summarised so far.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, page_size: int, device: torch.device | str) -> None:
        self.page_size = page_size
        empty = torch.empty(n_kv_heads, 0, head_dim, device=device)
        self.mean, self.kmin, self.kmax = empty, empty.clone(), empty.clone()

    @property
    def n_pages(self) -> int:
        return self.mean.shape[1]

    def update(self, lkv: LayerKV, rope: Rotary) -> None:
        """Summarise every full page of ``lkv`` not yet summarised (call after appends).

        Assumes pages are only appended (a selection policy never evicts); if the
        cache shrank, the summaries are rebuilt from scratch.
        """
        ps = self.page_size
        full = lkv.n // ps
        if full < self.n_pages:  # the cache was cut (e.g. a new prompt): start again
            h, _, d = self.mean.shape
            self.mean = self.kmin = self.kmax = self.mean.new_empty(h, 0, d)
        start = self.n_pages
        if full == start:
            return
        k, _, pos = lkv.read(start * ps, full * ps, values=False)
        raw = rope.rotate(k.float(), -pos)  # (Hkv, m * ps, D) position-free
        pages = raw.unflatten(1, (full - start, ps))  # (Hkv, m, ps, D)
        self.mean = torch.cat((self.mean, pages.mean(2)), dim=1)
        self.kmin = torch.cat((self.kmin, pages.amin(2)), dim=1)
        self.kmax = torch.cat((self.kmax, pages.amax(2)), dim=1)

    def bytes(self) -> int:
        """Bytes held by the summaries."""
        return self.mean.nbytes + self.kmin.nbytes + self.kmax.nbytes
