"""KVzip: keep what the model needs to reproduce the context (Kim et al. 2025, arXiv:2505.23416).

Question-agnostic: no question is known, so a token is rated by how much the
model attends to it when asked to repeat the context. Each prefill chunk is
fed a second time as a probe after the cache (``Runner.probe``; the probe's
KV is not stored): while re-reading the chunk, copy heads attend to the first
copy, and the tokens the model cannot predict (names, numbers, rare facts)
draw the most attention. A token's score is the largest attention any probe
query of its KV group gives it, kept as a running maximum over the chunks
(``LayerKV.acc``), so tokens from earlier chunks keep the score they earned
when they were reproduced. The paper scores with a "repeat the previous
context" prompt over a fully prefilled context; here the chunk is repeated
without a prompt, one chunk at a time, so resident KV stays within
``budget + chunk_size`` tokens per layer. Prefill costs about twice as much.
In question-aware mode the question's probe is used instead (as every other
attention-based method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkv.policies.base import AccumulatedScorePolicy, needs_window, window_attention


@dataclass
class KVzipPolicy(AccumulatedScorePolicy):
    """Keep the tokens the model attends to most while it repeats the context.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept.
        window: last tokens always kept.
        kernel: width (tokens, odd) of the max-pooling of the scores along the sequence.
        heads: how a token's scores in the KV heads of a layer are combined: sum or max.
        scope: ``layer`` (each layer keeps its own best tokens) or ``shared`` (one
            kept set for all layers: a token's shares of each layer's score, summed).

    Raises:
        LongKVError (from :meth:`validate`): budget below ``sinks + window``.
    """

    name = "kvzip"
    needs_queries: ClassVar[bool] = True
    reconstruct: ClassVar[bool] = True  # the runner probes each prefill chunk a second time
    accumulate: ClassVar[str] = "max"
    budget: int = 4096
    sinks: int = 4
    window: int = 32
    kernel: int = 1
    heads: str = "sum"
    scope: str = "layer"

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: torch.Tensor | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: the largest attention any observation query of the KV group gives each token."""
        return window_attention(keys, needs_window(self.name, queries), positions, reduce="max").amax(1)
