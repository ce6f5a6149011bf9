"""SnapKV: attention of an observation window, pooled (Li et al. 2024, arXiv:2404.14469).

The last queries of the prompt (the observation window) already attend to what
the generation will need. Each cached token is scored by the attention those
queries give it, averaged over the window and over the query heads of its KV
group, then max-pooled along the sequence so a token's neighbours are kept with
it (keeps phrases whole). Tokens are kept in whole runs of ``chunk``
(ChunkKV), which keeps more numbers whole. The window's own tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from longkv.policies.base import EvictionPolicy, Observation, needs_window, window_attention


@dataclass
class SnapKVPolicy(EvictionPolicy):
    """Keep the tokens the observation window attends to most.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept.
        window: last tokens always kept (the observation window's own tokens).
        kernel: width of the max-pooling along the sequence (odd, tokens). The
            paper pools over 7 (kvpress: 5); 15 keeps a whole number or name with
            its context: on 4 K-token book needles with SmolLM2-135M at 25 %
            kept, question-aware, 7 answered 3 of 10 (most answers lost their
            last digits) and 15 answered 9 of 10, as dense did (31: 6 of 10).
        chunk: tokens are kept in whole runs of this many, ranked by their
            mean pooled score (ChunkKV, Liu et al. 2025; 1 ranks token by
            token; not the prefill chunk). On the held needle split
            (``benchmarks/compression.py --forms held``), question-aware, 8
            answered SmolLM2-135M 9 of 10 at 25 % kept (1: 7 of 10; 16: 6 of
            10) and Qwen2.5-Coder-0.5B 7 of 8 at 10 % (1: 6 of 8), and the same
            as 1 on the benchmark's own needle (9 of 10 at 25 %). Runs without
            the pooling (``kernel=1``) lost digits: 3 of 10 at 25 %.

    Raises:
        LongKVError (from :meth:`validate`): budget below ``sinks + window``.
    """

    name = "snapkv"
    needs_queries: ClassVar[bool] = True
    budget: int = 4096
    sinks: int = 4
    window: int = 32
    kernel: int = 15
    chunk: int = 8

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: mean window attention per token, max-pooled over ``kernel`` neighbours."""
        attn = window_attention(keys, needs_window(self.name, queries), positions).mean(1)  # (Hkv, N)
        if self.kernel > 1:
            attn = F.max_pool1d(attn[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        return attn
