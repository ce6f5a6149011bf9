"""Write a tiny Hugging Face model folder as a GGUF file, the way llama.cpp's converter lays it out.

Test helper: it turns the folders made by ``conftest.make_tiny_hf_model`` (config.json, one
model.safetensors, the byte-level BPE tokenizer of ``conftest._tiny_tokenizer``) into the GGUF file
llama.cpp's ``convert_hf_to_gguf.py`` would write for them, with the ``gguf`` library's writer:

* ``general.architecture``: llama, qwen2, qwen3, gemma3, phi3. Mistral is converted as ``llama``
  (llama.cpp registers ``MistralForCausalLM`` under its llama converter), and that converter writes no
  ``sliding_window``: a Mistral GGUF has no sliding window, and llama.cpp's llama graph reads none.
  :func:`gguf_equivalent_overrides` says which HF config fields a file cannot carry (that window,
  Gemma 3's ``query_pre_attn_scalar``).
* the hyperparameters under ``<arch>.*`` that each of llama.cpp's converters writes (llama and mistral:
  ``vocab_size`` and ``rope.dimension_count``; phi3: ``rope.dimension_count`` for partial rotary and
  ``attention.sliding_window``; gemma3: ``attention.sliding_window``, ``rope.freq_base`` of the global
  layers, ``rope.freq_base_swa``, linear ``rope.scaling.*``; every family but phi3:
  ``attention.key_length`` and ``value_length`` when config.json states ``head_dim``);
* tensors under llama.cpp's names, with its three rewrites: q/k rows of llama and mistral reordered for
  interleaved RoPE (``LlamaModel.permute``), Gemma's RMSNorm weights stored with the 1 of ``x * (1 + w)``
  added, Llama 3.x RoPE scaling stored as a ``rope_freqs`` tensor of per-frequency divisors, Phi-3's
  LongRoPE as ``rope_factors_long`` / ``rope_factors_short`` with ``rope.scaling.attn_factor``;
* the tokenizer as ``tokenizer.ggml.model = "gpt2"`` (``pre = "gpt-2"``: the tokenizer splits with GPT-2's
  regex), every id's token and type, the merges, the special ids and the chat template.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# HF model_type -> GGUF general.architecture (llama.cpp converts Mistral with its llama converter)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}

_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 3 has four norms per block: its post_attention_layernorm follows attention, and the
# norm before the MLP is pre_feedforward_layernorm (llama.cpp's ffn_norm)
_BLOCK_GEMMA3 = {
    **_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Phi-3 keeps q, k, v in one projection, and gate then up in another (llama.cpp's ffn_up)
_BLOCK_PHI3 = {**_BLOCK, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}

_TENSOR_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# An edit of the tensors before they are written: (GGUF name, array) -> the pairs to write instead.
TensorEdit = Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]


def gguf_tensor_name(hf_name: str, model_type: str) -> str:
    """llama.cpp's name for the HF parameter ``hf_name`` of a ``model_type`` model.

    Raises:
        ValueError: a parameter llama.cpp's converter for that family does not know.
    """
    if hf_name in _TOP:
        return _TOP[hf_name]
    block = _BLOCK_GEMMA3 if model_type == "gemma3_text" else _BLOCK_PHI3 if model_type == "phi3" else _BLOCK
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias"):
        stem = ".".join(parts[3:-1])
        if stem in block:
            return f"blk.{parts[2]}.{block[stem]}.{parts[-1]}"
    raise ValueError(f"{hf_name}: no GGUF name for this {model_type} parameter")


def gguf_equivalent_overrides(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """HF config fields a llama.cpp GGUF of this model cannot carry, with the value the file implies.

    Mistral: llama.cpp writes its files as ``llama``, without the sliding window, and runs every layer
    globally; the model such a file describes is the HF model with ``sliding_window=None``.
    Gemma 3: no key holds ``query_pre_attn_scalar``; llama.cpp scales attention by ``head_dim ** -0.5``
    (``(hidden / heads) ** -0.5`` for the 62-layer 27B).
    """
    if model_type == "mistral" and config.get("sliding_window"):
        return {"sliding_window": None}
    if model_type == "gemma3_text":
        implied = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 else _head_dim(config)
        if config.get("query_pre_attn_scalar", 256) != implied:  # 256: transformers' default
            return {"query_pre_attn_scalar": implied}
    return {}


def write_gguf(hf_folder: Path, out: Path, dtype: str = "f32", edit: TensorEdit | None = None) -> Path:
    """Convert the tiny HF model in ``hf_folder`` to the GGUF file ``out``; return ``out``.

    Args:
        hf_folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
            (and chat_template.jinja when the tokenizer has a template).
        out: the file to write (its folder is created).
        dtype: matrices stored as ``"f32"``, ``"f16"`` or ``"q8_0"``; vectors (norms, biases) stay
            float32, as llama.cpp keeps them.
        edit: called with every tensor's GGUF name and array as it would be written; the pairs it
            returns are written instead (a test's way to rename or drop a tensor).

    Raises:
        ValueError: a model type, tensor or dtype this writer does not handle.
    """
    from safetensors.torch import load_file

    if dtype not in _TENSOR_TYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(_TENSOR_TYPES)}")
    cfg = json.loads((hf_folder / "config.json").read_text())
    model_type = cfg["model_type"]
    if model_type not in GGUF_ARCH:
        raise ValueError(f"model_type {model_type!r}: the GGUF writer knows {sorted(GGUF_ARCH)}")
    arch = GGUF_ARCH[model_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(hf_folder.name)
    _write_hparams(writer, model_type, cfg)
    writer.add_file_type(_TENSOR_TYPES[dtype][1])
    _write_tokenizer(writer, hf_folder, int(cfg["vocab_size"]))

    weights = {k: v.float().numpy() for k, v in load_file(str(hf_folder / "model.safetensors")).items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in weights:
        del weights["lm_head.weight"]  # a tied head is the embedding: llama.cpp writes no output.weight
    tensors: list[tuple[str, np.ndarray]] = []
    if (factors := _llama3_rope_factors(model_type, cfg)) is not None:
        tensors.append(("rope_freqs.weight", factors))
    tensors += _longrope_factors(model_type, cfg)
    for hf_name, arr in weights.items():
        tensors.append((gguf_tensor_name(hf_name, model_type), _convert(hf_name, arr, model_type, cfg)))
    for name, arr in tensors:
        for new_name, new_arr in edit(name, arr) if edit is not None else [(name, arr)]:
            _add_tensor(writer, new_name, new_arr, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# --------------------------------------------------------------------------- hyperparameters


def _rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """RoPE parameters of one layer type, from ``rope_parameters`` (transformers 5) or the older keys."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if layer_type in rp:
        return dict(rp[layer_type])
    params = dict(rp)
    if "rope_theta" not in params and cfg.get("rope_theta") is not None:
        params["rope_theta"] = cfg["rope_theta"]
    return params


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _write_hparams(w: gguf.GGUFWriter, model_type: str, cfg: dict[str, Any]) -> None:
    full = _rope_params(cfg)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if model_type == "phi3":  # llama.cpp's Phi-3 converter writes its own set, without key_length
        rotary = int(float(full.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) * cfg["hidden_size"]) // int(cfg["num_attention_heads"])
        w.add_rope_dimension_count(rotary)
        orig = int(full.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(orig)
        if full.get("rope_type", full.get("type")) in ("longrope", "su"):  # as llama.cpp's converter computes it
            scale = int(cfg["max_position_embeddings"]) / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))  # 0: no window (Phi-4)
        return
    if cfg.get("head_dim") is not None:
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    if model_type in ("llama", "mistral"):
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(_head_dim(cfg))
    if model_type == "gemma3_text":
        local = _rope_params(cfg, "sliding_attention")
        if "rope_theta" in local or cfg.get("rope_local_base_freq") is not None:
            w.add_rope_freq_base_swa(float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        w.add_sliding_window(int(cfg["sliding_window"]))


# --------------------------------------------------------------------------- tensors


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for interleaved RoPE: per head, rows (0, half, 1, half + 1, ...)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(hf_name: str, arr: np.ndarray, model_type: str, cfg: dict[str, Any]) -> np.ndarray:
    if model_type in ("llama", "mistral"):
        if ".self_attn.q_proj." in hf_name:
            arr = _permute_rope_rows(arr, int(cfg["num_attention_heads"]))
        elif ".self_attn.k_proj." in hf_name:
            arr = _permute_rope_rows(arr, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    if model_type == "gemma3_text" and hf_name.endswith("norm.weight"):
        arr = arr + 1.0  # Gemma3RMSNorm computes x * (1 + w): llama.cpp stores 1 + w
    return np.ascontiguousarray(arr, dtype=np.float32)


def _llama3_rope_factors(model_type: str, cfg: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.x RoPE scaling as llama.cpp stores it: one divisor per frequency (``rope_freqs``)."""
    params = _rope_params(cfg)
    if model_type not in ("llama", "mistral") or params.get("rope_type") != "llama3":
        return None
    dim = _head_dim(cfg)
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _longrope_factors(model_type: str, cfg: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Phi-3's LongRoPE factors as llama.cpp stores them: two float32 tensors, one divisor per rotated pair."""
    params = _rope_params(cfg)
    if model_type != "phi3" or params.get("rope_type", params.get("type")) not in ("longrope", "su"):
        return []
    return [(f"rope_factors_{k}.weight", np.asarray(params[f"{k}_factor"], dtype=np.float32)) for k in ("long", "short")]


def _add_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, dtype: str) -> None:
    qtype = _TENSOR_TYPES[dtype][0]
    if arr.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


# --------------------------------------------------------------------------- tokenizer


def _write_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``_set_vocab_gpt2`` writes it.

    Every id below ``vocab_size`` gets a token: the tokenizer's, or ``[PAD<id>]`` (type UNUSED) where it
    has none; its added special tokens are CONTROL, its other added tokens USER_DEFINED.
    """
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: a {model.get('type')} tokenizer; the writer handles byte-level BPE")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added.get(i, {}).get("special")
                         else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {a["content"]: i for i, a in added.items()}

    def special_id(key: str) -> int | None:
        entry = tok_cfg.get(key)
        content = entry.get("content") if isinstance(entry, dict) else entry
        return ids.get(content) if isinstance(content, str) else None

    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        if (token_id := special_id(key)) is not None:
            add(token_id)
    for typ in ("bos", "eos"):
        if isinstance(tok_cfg.get(f"add_{typ}_token"), bool):
            (w.add_add_bos_token if typ == "bos" else w.add_add_eos_token)(tok_cfg[f"add_{typ}_token"])
    template = tok_cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)
