"""The contract of an architecture family, and the one registry of them.

A family lives in one module, ``longkv/models/<model_type>.py``, named after its
Hugging Face ``model_type``. The module holds the forward class and a
``FAMILY = Family(...)`` that says everything the rest of longkv needs to know:

* how ``config.json`` and GGUF metadata map onto :class:`~longkv.config.ModelConfig`
  beyond the fields every family shares (``hf_config``, ``gguf_config``), including
  its per-layer attention specs (sliding or global, RoPE base and scaling);
* how its GGUF tensor names map onto the HF names the forward reads
  (``gguf_names``), and what loading does to a weight on the way (``load_weight``:
  llama.cpp's q/k row order, Gemma's norm offsets);
* which forward runs it (``forward``).

``longkv/models/__init__.py`` imports every family module and lists its ``FAMILY``
in :data:`FAMILIES`: adding a family is one file plus one line there
(docs/models.md walks through it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from longkv.errors import LongKVError

if TYPE_CHECKING:
    from longkv.config import ModelConfig
    from longkv.models.llama import LlamaModel

Source = Literal["hf", "gguf"]
# fields: the ModelConfig keyword arguments read so far; a hook returns them updated
HFConfigHook = Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]
# get(key, default) reads "<arch>.<key>" from the GGUF metadata; tensors: the file's tensors (name -> array,
# or only their names where the caller has no data)
GGUFConfigHook = Callable[[Callable[..., Any], "Mapping[str, Any] | Collection[str]", dict[str, Any]], dict[str, Any]]
WeightHook = Callable[["ModelConfig", str, torch.Tensor, torch.dtype, Source], torch.Tensor]


def _hf_fields_as_read(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return fields


def _gguf_fields_as_read(get: Callable[..., Any], tensors: Mapping[str, Any] | Collection[str], fields: dict[str, Any]) -> dict[str, Any]:
    return fields


def as_stored(config: ModelConfig, name: str, w: torch.Tensor, dtype: torch.dtype, source: Source) -> torch.Tensor:
    """The default :attr:`Family.load_weight`: the tensor as stored, in the compute dtype."""
    return w.to(dtype)


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        model_type: HF ``model_type`` (also :attr:`ModelConfig.arch` of a loaded model).
        gguf_arch: GGUF ``general.architecture`` of its files, as llama.cpp writes them.
        models: the checkpoints it runs, for ``longkv models``.
        features: what its forward does beyond the llama block, for ``longkv models``.
        forward: the model class (``Model(config, weights, decode_weights)``).
        hf_config: ``(config_json, fields) -> fields``: the family's own ``config.json`` keys.
        gguf_config: ``(get, tensors, fields) -> fields``: its own GGUF metadata.
        gguf_names: GGUF per-layer tensor names (after ``blk.N.``) -> HF names (after
            ``model.layers.N.``), beyond and over the llama block's.
        gguf_config_tensors: GGUF tensors that ``gguf_config`` reads (RoPE factors): not weights,
            but not unknown either (a file with a tensor no one reads is refused).
        load_weight: ``(config, hf_name, tensor, dtype, source) -> tensor`` for each weight
            as loaded (float32 from GGUF, the stored dtype from safetensors).
        refused_model_types: ``model_type`` values close to this family's that it does not
            run, with the reason shown to the user.
    """

    model_type: str
    gguf_arch: str
    models: str
    features: str
    forward: type[LlamaModel]
    hf_config: HFConfigHook = _hf_fields_as_read
    gguf_config: GGUFConfigHook = _gguf_fields_as_read
    gguf_names: Mapping[str, str] = field(default_factory=dict)
    gguf_config_tensors: tuple[str, ...] = ()
    load_weight: WeightHook = as_stored
    refused_model_types: Mapping[str, str] = field(default_factory=dict)


def family_of(arch: str, source: Source | None = None) -> Family:
    """The registered family of ``arch``: an HF ``model_type`` (``source="hf"``), a GGUF
    ``general.architecture`` (``"gguf"``), or either (``None``).

    Raises:
        LongKVError: no family has that name (the message lists the supported ones).
    """
    from longkv.models import FAMILIES

    for fam in FAMILIES:
        if (source != "gguf" and arch == fam.model_type) or (source != "hf" and arch == fam.gguf_arch):
            return fam
    for fam in FAMILIES:
        if source != "gguf" and arch in fam.refused_model_types:
            raise LongKVError(fam.refused_model_types[arch])
    what = {"hf": f"model_type {arch!r} in config.json", "gguf": f"GGUF architecture {arch!r}"}.get(source or "", f"architecture {arch!r}")
    names = sorted(({f.model_type for f in FAMILIES} if source != "gguf" else set()) | ({f.gguf_arch for f in FAMILIES} if source != "hf" else set()))
    raise LongKVError(f"unsupported {what}: longkv runs {', '.join(names)} (see `longkv models`)")


def expected_shape(config: ModelConfig, hf_name: str) -> tuple[int | None, ...] | None:
    """The shape ``config`` implies for the weight ``hf_name`` (``None`` in a dimension: not implied,
    e.g. the embedding's rows, which may exceed the tokenizer's size); ``None``: a name with no
    shape rule."""
    c = config
    q, kv, hid, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (None, hid)
    if hf_name == "model.norm.weight":
        return (hid,)
    rest = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else ""
    return {
        "self_attn.q_proj.weight": (q, hid), "self_attn.k_proj.weight": (kv, hid), "self_attn.v_proj.weight": (kv, hid),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.qkv_proj.weight": (q + 2 * kv, hid), "self_attn.o_proj.weight": (hid, q),
        "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
        "mlp.gate_proj.weight": (ff, hid), "mlp.up_proj.weight": (ff, hid), "mlp.gate_up_proj.weight": (2 * ff, hid),
        "mlp.down_proj.weight": (hid, ff),
        "input_layernorm.weight": (hid,), "post_attention_layernorm.weight": (hid,),
        "pre_feedforward_layernorm.weight": (hid,), "post_feedforward_layernorm.weight": (hid,),
    }.get(rest)  # fmt: skip


def check_shape(config: ModelConfig, hf_name: str, shape: tuple[int, ...], stored_as: str) -> None:
    """Raise when a weight's shape is not the one ``config`` implies.

    Raises:
        LongKVError: naming the tensor as stored (``stored_as``), its shape and the expected one.
    """
    want = expected_shape(config, hf_name)
    if want is not None and (len(want) != len(shape) or any(w is not None and w != d for w, d in zip(want, shape, strict=False))):
        exp = "x".join("*" if w is None else str(w) for w in want)
        raise LongKVError(f"tensor {stored_as} has shape {'x'.join(map(str, shape))}, the model's config implies {exp}: "
                          "the file is inconsistent (a broken conversion or a different model); download or convert it again")
