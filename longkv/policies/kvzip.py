"""KVzip: keep what the model needs to reproduce the context (Kim et al. 2025, arXiv:2505.23416).

Question-agnostic: no question is known, so a token is rated by how much the
model attends to it when asked to repeat the context. Each prefill chunk is
fed a second time as a probe after the cache (``Runner.probe``; the probe's
KV is not stored): while re-reading the chunk, copy heads attend to the first
copy, so a token is worth keeping when reproducing the text needs it (the
paper's premise: what the model needs to rebuild the context is what any
question can ask about). A token's score is the largest attention any probe
query of its KV group gives it, kept as a running maximum over the chunks
(``LayerKV.acc``), so tokens from earlier chunks keep the score they earned
when they were reproduced. By default one kept set serves every layer
(``scope=shared``): each layer's scores as shares of its total, summed. The paper scores with a "repeat the previous
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
        scope: ``shared`` (one kept set for all layers: a token's shares of each
            layer's score, summed) or ``layer`` (each layer keeps its own best
            tokens). On the 5 hardest of 10 4 K-token needle samples (SmolLM2-135M,
            50 % kept) shared answered 3 and per-layer 0: per layer, most
            layers kept only some of the needle's digits.

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
    scope: str = "shared"

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
