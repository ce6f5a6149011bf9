"""Mistral (HF ``mistral``): the llama block without biases, every layer attending over a
sliding window (``sliding_window`` in config.json; 4096 in Mistral 7B v0.1, none from
v0.2 on). The window lives in the config's per-layer specs; the forward is
:class:`~longkv.models.llama.LlamaModel`'s. llama.cpp writes Mistral 7B GGUF files with
the architecture ``llama`` and no window (its runtime attends globally), q/k rows
permuted like Llama's: they load through the llama family, as llama.cpp reads them.
"""

from __future__ import annotations

from longkv.models.family import Family
from longkv.models.llama import LlamaModel, llama_gguf_config, load_llama_weight

FAMILY = Family(
    model_type="mistral",
    gguf_arch="llama",  # llama.cpp's converter writes Mistral as llama (without the window)
    models="Mistral 7B and other llama-shaped models without biases",
    features="the llama block, sliding-window attention on every layer",
    forward=LlamaModel,
    gguf_config=llama_gguf_config,
    gguf_config_tensors=("rope_freqs.weight",),
    load_weight=load_llama_weight,
)
