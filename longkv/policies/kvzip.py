"""KVzip: keep what the model needs to reproduce the context (Kim et al. 2025, arXiv:2505.23416).

Question-agnostic: no question is known, so a token is rated by how much the
model attends to it when asked to repeat the context. Each prefill chunk is
fed a second time as a probe after the cache (``Runner.probe_work``; the probe's
KV is not stored): while re-reading the chunk, copy heads attend to the first
copy, so a token is worth keeping when reproducing the text needs it (the
paper's premise: what the model needs to rebuild the context is what any
question can ask about). A token's score is the largest attention any probe
query of its KV group gives it, kept as a running maximum over the chunks
(``LayerKV.acc``), so tokens from earlier chunks keep the score they earned
when they were reproduced. By default one kept set serves every layer
(``scope=shared``): a token's score in a layer is its largest over the KV
heads, as a share of the layer's total, and its best share over the layers
ranks it, max-pooled over 15 neighbours. The paper scores with a "repeat the previous
context" prompt over a fully prefilled context; here the chunk is repeated
without a prompt, one chunk at a time, so resident KV stays within
``budget + chunk_size`` tokens per layer. Prefill costs about twice as much.
KVzip is question-agnostic by construction: it scores by the repeat in both
modes (a question, when known, does not change what it keeps), so one
compressed context serves any later question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longkv.policies.base import AccumulatedScorePolicy, Observation, needs_window, window_attention


@dataclass
class KVzipPolicy(AccumulatedScorePolicy):
    """Keep the tokens the model attends to most while it repeats the context.

    Attributes:
        budget: tokens kept per layer.
        sinks: first tokens always kept.
        window: last tokens always kept.
        kernel: width (tokens, odd) of the max-pooling of the scores along the
            sequence: a kept token brings its neighbours (a number, a name whole).
        heads: how a token's scores in the KV heads of a layer are combined: max or sum.
        scope: ``shared`` (one kept set for all layers) or ``layer`` (each layer
            keeps its own best tokens).
        layers: with ``scope=shared``, how a token's shares of each layer's total
            score are combined over layers: max (it matters in some layer) or sum.
        chunk: tokens are kept in whole runs of this many, ranked by their mean
            pooled score (ChunkKV; 1: token by token). On the held needle split
            at 25 % kept, 8 answered Qwen2.5-Coder-0.5B 6 of 8 against 3 of 8
            token by token (which lost the numbers' first digits).

    Defaults were chosen on 10 samples of a 4 K-token book context with one
    needle (SmolLM2-135M), from the scores of a chunked prefill with one
    selection at the end: heads max / layers max / kernel 15 kept the
    needle's name and all its digits in 10 of 10 samples at 50, 25 and 10 %
    kept; the sum of shares without pooling in 1, 0 and 0 (it dropped names);
    without pooling no rule kept them whole (``benchmarks/compression.py``
    measures the answers).

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
    kernel: int = 15
    chunk: int = 8
    heads: str = "max"
    scope: str = "shared"
    layers: str = "max"

    def score(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: Observation | None,
    ) -> torch.Tensor:
        """(Hkv, N) float32: the largest attention any observation query of the KV group gives each token."""
        return window_attention(keys, needs_window(self.name, queries), positions, reduce="max").amax(1)
