"""Retrieval heads: the few attention heads that look up a fact far back in the input.

In a trained transformer a small share of the query heads (a few percent) does
the copying of a fact from far back; the rest attend locally or to the sinks
(Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"; DuoAttention, Xiao et al. 2024, and RazorAttention, Tang et al.
2024, use the same split to keep full KV only for such heads). Which heads
they are depends on the model, not on the input, so they are found once per
model by a calibration run (``benchmarks/retrieval_heads.py``): facts planted
in long text, asked for, and every head's ranking of the fact's page compared.

``block_topk`` uses them to choose its pages at the question (``heads=auto``):
a page's score is the mean, over the retrieval heads, of the log of the share
of attention the head's queries would give it, instead of a vote over every
(layer, head, query) row, where the many heads that do not retrieve add noise
that grows with the number of pages. Measured in docs/sparse.md ("Retrieval
heads").

A head is written ``LAYER.HEAD`` (both from 0, HEAD a query head), several
joined by ``+``: ``heads=7.7+18.6+18.7``.
"""

from __future__ import annotations

from longkv.config import ModelConfig
from longkv.errors import LongKVError

#: Calibrated retrieval heads by model shape (see :func:`fingerprint`): (layer, query head) pairs,
#: best first. Produced by ``benchmarks/retrieval_heads.py`` (command and data in docs/sparse.md).
KNOWN: dict[str, tuple[tuple[int, int], ...]] = {
    # SmolLM2-135M(-Instruct): 15 questions at 32 K, seed 1000 (benchmarks/results/retrieval_heads_smollm2.json)
    "llama:30x9x3x64:576:49152": ((18, 7), (18, 6), (17, 3), (7, 7), (15, 6)),
    # Qwen2.5-Coder-0.5B(-Instruct): 15 questions at 32 K, seed 1000, 8 best of 15 heads found in >= 87 %
    # (benchmarks/results/retrieval_heads_qwen05.json, written before GGUF files without <arch>.vocab_size
    # got their vocabulary size from the tokenizer: its "fingerprint" field reads ...:0)
    "qwen2:24x14x2x64:896:151936": ((11, 12), (11, 11), (11, 9), (9, 13), (9, 10), (9, 9), (9, 8), (7, 8)),
}


def fingerprint(config: ModelConfig) -> str:
    """A model's shape as a key of :data:`KNOWN`, e.g. ``"llama:30x9x3x64:576:49152"``.

    Fine-tunes of one base model share it (and, as far as measured, their retrieval heads).
    """
    c = config
    return f"{c.arch}:{c.n_layers}x{c.n_heads}x{c.n_kv_heads}x{c.head_dim}:{c.hidden_size}:{c.vocab_size}"


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """``"7.7+18.6"`` -> ``[(7, 7), (18, 6)]``.

    Raises:
        LongKVError: not of the form ``LAYER.HEAD+LAYER.HEAD...`` with integers >= 0.
    """
    out: list[tuple[int, int]] = []
    for item in spec.split("+"):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise LongKVError(
                f"bad block_topk heads {spec!r}: write auto, all, or LAYER.HEAD joined by '+' (e.g. heads=7.7+18.6)"
            )
        out.append((int(layer), int(head)))
    return out


def check_heads(spec: str) -> None:
    """Raise :class:`LongKVError` if ``spec`` is not ``auto``, ``all`` or a list of heads."""
    if spec not in ("auto", "all"):
        parse_heads(spec)


def resolve_heads(spec: str, config: ModelConfig) -> list[tuple[int, int]] | None:
    """The retrieval heads ``spec`` names for this model, or None for "every row".

    ``"all"``: None. ``"auto"``: the calibrated heads of this model's shape from
    :data:`KNOWN`, None when it has none. Otherwise the heads listed.

    Raises:
        LongKVError: a bad spec, or a head beyond the model's layers or query heads.
    """
    if spec == "all":
        return None
    if spec == "auto":
        known = KNOWN.get(fingerprint(config))
        return list(known) if known else None
    heads = parse_heads(spec)
    for layer, head in heads:
        if layer >= config.n_layers or head >= config.n_heads:
            raise LongKVError(
                f"block_topk head {layer}.{head} is not in this model ({config.n_layers} layers x "
                f"{config.n_heads} query heads, both counted from 0): fix heads= or use heads=auto"
            )
    return heads
