"""Short dense reads of a few chosen pages, apart from the engine's cache (used by ``block_topk``).

* :func:`reencode_pages`: the sink pages + the selected pages encoded together
  as one short text, whose keys and values the answer then reads;
* :func:`greedy_confidence`: how confidently the model answers from such a
  short text (``block_topk``'s ``verify``).
"""

from __future__ import annotations

import torch

from longkv.attention.dense import attend
from longkv.models.llama import LlamaModel


def reencode_pages(
    model: LlamaModel, context: list[int], pages: torch.Tensor, sinks: int, ps: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Keys and values of the sink pages + ``pages`` (k,) computed together, as one short text.

    Why: the cached keys of a far page were computed by a prefill that saw only
    sinks + a local window around it, at a distance from the sinks unlike any
    the answer will use; SmolLM2 then fails to read the needle from a correctly
    selected page (docs/sparse.md). Encoding the few selected pages again right
    after the sinks, at consecutive positions (the layout attention uses), gives
    keys it reads. Costs one dense forward of ``sinks + k * page_size`` tokens.
    """
    idx = torch.cat((torch.arange(sinks), (pages[:, None] * ps + torch.arange(ps)).flatten()))
    toks = torch.tensor(context, dtype=torch.int64)[idx]
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def block_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out.append((k, v, idx))
        return attend(q, k, v, pos, pos)  # causal over the block

    model.forward(toks, torch.arange(idx.numel()), block_attention, "none")
    return out


def greedy_confidence(model: LlamaModel, toks: torch.Tensor, n: int) -> float:
    """Mean log-probability of the ``n`` greedy tokens that follow ``toks`` (T,), read densely
    at positions 0..T-1 with a throw-away cache (the engine's cache is not touched)."""
    kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * model.config.n_layers

    def cached_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        old = kv[layer]
        if old is not None:
            k, v, pos_k = torch.cat((old[0], k), 1), torch.cat((old[1], v), 1), torch.cat((old[2], pos))
        else:
            pos_k = pos
        kv[layer] = (k, v, pos_k)
        return attend(q, k, v, pos, pos_k)

    logits = model.forward(toks, torch.arange(toks.numel()), cached_attention, "last")
    total = 0.0
    for i in range(n):
        assert logits is not None
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), dim=-1)
        tok = int(logp.argmax())
        total += float(logp[tok])
        if i + 1 < n:
            logits = model.forward(torch.tensor([tok]), torch.tensor([toks.numel() + i]), cached_attention, "last")
    return total / n
