"""One module per architecture family, named after HF ``model_type``.

Every module exposes a model class with the same contract:
``Model(config, weights)`` and ``Model.forward(input_ids, positions, attention, logits_at)``.
"""

from __future__ import annotations

import torch

from longkv.config import ModelConfig
from longkv.errors import LongKVError
from longkv.models.gemma3 import Gemma3Model
from longkv.models.llama import AttentionFn, LlamaModel
from longkv.models.phi3 import Phi3Model
from longkv.models.qwen2 import Qwen2Model
from longkv.models.qwen3 import Qwen3Model

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
    "gemma3_text": Gemma3Model,  # HF model_type
    "gemma3": Gemma3Model,  # GGUF general.architecture
    "phi3": Phi3Model,
}


def build(
    config: ModelConfig, weights: dict[str, torch.Tensor], decode_weights: str = "none", device: torch.device | str | None = None
) -> LlamaModel:
    """Instantiate the model class registered for ``config.arch`` (``decode_weights``: see LlamaModel).

    ``device``: move the weights there first (``None``: leave them where they are).

    Raises:
        LongKVError: the architecture has no implementation.
        ValueError: int8/int4 decode weights off the CPU.
    """
    try:
        cls = MODEL_CLASSES[config.arch]
    except KeyError:
        raise LongKVError(f"no forward for architecture {config.arch!r}: supported are {sorted(MODEL_CLASSES)}") from None
    if device is not None:
        weights = {name: w.to(device) for name, w in weights.items()}
    return cls(config, weights, decode_weights)


__all__ = ["MODEL_CLASSES", "AttentionFn", "Gemma3Model", "LlamaModel", "Phi3Model", "Qwen2Model", "Qwen3Model", "build"]
