"""Ranking pages for block_topk: z-scores, votes over rows, top-k with neighbours.

A "row" is one (layer, KV head, query) rating of every candidate page; rows of
different scales are made comparable by z-scoring them over the pages, and a
page's vote is the mean of its best z-scores.
"""

from __future__ import annotations

import torch


def vote(z: torch.Tensor, votes: int) -> torch.Tensor:
    """(..., R, C) z-scores -> (..., C): the mean of each page's ``votes`` best z-scores over the R rows."""
    return z.topk(min(votes, z.shape[-2]), dim=-2).values.mean(-2)


def merge_votes(best: torch.Tensor | None, rows: torch.Tensor, votes: int) -> torch.Tensor:
    """Keep each page's ``votes`` best z-scores: (<= votes, C) so far + (R, C) new rows -> (<= votes, C).

    Merging layer by layer gives the same top rows as one top-k over every row,
    without holding all of them (memory ~ votes x pages).
    """
    rows = rows if best is None else torch.cat((best, rows))
    return rows.topk(min(votes, rows.shape[0]), dim=0).values


def zscore(s: torch.Tensor) -> torch.Tensor:
    """(..., C) scores -> z-scores over the pages, so queries, heads and layers of different scales compare."""
    if s.shape[-1] < 2:
        return torch.zeros_like(s)
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)


def top_pages(cand: torch.Tensor, scores: torch.Tensor, k: int, expand: int = 0) -> torch.Tensor:
    """(G, C) scores over candidate pages ``cand`` (C,) -> (G, m) selected page ids, sorted.

    m = min(k, C) pages; with ``expand`` (G must be 1) each chosen page also brings
    its ``expand`` neighbours on each side that are candidates (duplicates merged).
    """
    k = min(k, cand.numel())
    idx = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
    if expand and idx.numel():
        assert idx.shape[0] == 1, "expand needs one selection (scope shared or layer)"
        near = (idx[0][:, None] + torch.arange(-expand, expand + 1, device=idx.device)).flatten()
        idx = near[(near >= 0) & (near < cand.numel())].unique()[None]  # unique() sorts
    return cand[idx]
