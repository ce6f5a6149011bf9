"""One module per architecture family, named after its HF ``model_type``, and the one
registry of them (:data:`FAMILIES`; the contract: :mod:`longkv.models.family`).

Every family's forward has the same contract:
``Model(config, weights, decode_weights, weight_bits)`` and
``Model.forward(input_ids, positions, attention, logits_at)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from longkv.config import ModelConfig
from longkv.models import gemma3, llama, mistral, phi3, qwen2, qwen3
from longkv.models.family import Family, family_of
from longkv.models.gemma3 import Gemma3Model
from longkv.models.llama import AttentionFn, LlamaModel
from longkv.models.phi3 import Phi3Model
from longkv.models.qwen2 import Qwen2Model
from longkv.models.qwen3 import Qwen3Model

# The registry: one line per family.
FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    gemma3.FAMILY,
    phi3.FAMILY,
)


def build(
    config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none", device: torch.device | str | None = None,
    weight_bits: Mapping[str, int] | None = None,
) -> LlamaModel:
    """Instantiate the forward of ``config.arch``'s family (``decode_weights``, ``weight_bits``: see LlamaModel).

    ``device``: move the weights there first (``None``: leave them where they are).

    Raises:
        LongKVError: a weight is missing.
        ValueError: int8/int4 decode weights off the CPU.
    """
    cls = family_of(config.arch).forward
    if device is not None:
        weights = {name: w.to(device) for name, w in weights.items()}
    return cls(config, weights, decode_weights, weight_bits)


__all__ = ["FAMILIES", "AttentionFn", "Family", "Gemma3Model", "LlamaModel", "Phi3Model", "Qwen2Model", "Qwen3Model", "build", "family_of"]
