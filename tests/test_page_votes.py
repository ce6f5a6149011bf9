"""Page ranking helpers of block_topk: z-scores, votes merged layer by layer, top-k with neighbours."""

from __future__ import annotations

import torch

from longkv.policies.page_votes import merge_votes, top_pages, vote, zscore


def test_shared_score_is_the_mean_of_the_best_votes_over_all_rows() -> None:
    # The running merge over layers in select() must equal one top-k over every row.
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]  # (Hkv, R, C) scores per layer
    z = [zscore(s) for s in layers]
    assert torch.allclose(z[0].mean(-1), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(z[0].std(-1), torch.ones(2, 5), atol=1e-5)
    rows = torch.cat([zl.flatten(0, 1) for zl in z])  # (30, C)
    expected = rows.sort(dim=0, descending=True).values[:4].mean(0)
    torch.testing.assert_close(vote(rows[None], 4)[0], expected)
    best = None
    for zl in z:  # layer by layer, as select() does
        best = merge_votes(best, zl.flatten(0, 1), 4)
    assert best is not None and best.shape == (4, 7)
    torch.testing.assert_close(best.mean(0), expected)


def test_expand_brings_neighbour_pages_inside_the_candidates() -> None:
    cand = torch.arange(1, 11)  # pages 1..10 may be retrieved
    scores = torch.zeros(1, 10)
    scores[0, [0, 4, 5, 9]] = torch.tensor([3.0, 2.0, 1.0, 4.0])  # pages 1, 5, 6, 10
    assert top_pages(cand, scores, 3).tolist() == [[1, 5, 10]]
    assert top_pages(cand, scores, 3, expand=1).tolist() == [[1, 2, 4, 5, 6, 9, 10]]  # merged, clipped to 1..10
