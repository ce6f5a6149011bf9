"""Frozen configuration dataclasses: what a model is, and how the engine runs it.

:class:`ModelConfig` is built either from a Hugging Face ``config.json`` dict
(:meth:`ModelConfig.from_hf_config`) or from the metadata of a GGUF file
(:meth:`ModelConfig.from_gguf`); both give the same object for the same model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longkv.errors import LongKVError


def longkv_home() -> Path:
    """Cache root: ``$LONGKV_HOME`` or ``~/.cache/longkv`` (models, tokenizers, KV tiers, agent runs)."""
    return Path(os.environ.get("LONGKV_HOME", Path.home() / ".cache" / "longkv")).expanduser()

ASK_DRY_MULTIPLIER = 0.8  # the loop guard (DRY) of ``longkv ask`` and ``LLM.ask``: benchmarks/loops.py

# HF ``model_type`` / GGUF ``general.architecture`` -> the module in longkv.models.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "Llama 2/3.x, SmolLM/SmolLM2, TinyLlama",
    "mistral": "Mistral 7B and other llama-shaped models without biases",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases, GQA)",
    "qwen3": "Qwen3 (QK-norm: RMSNorm of each query and key head before RoPE, GQA)",
    "gemma3_text": "Gemma 3 text (270M-27B): 5 sliding-window layers per global one, two RoPE bases, QK-norm",
    "gemma3": "Gemma 3 text as llama.cpp names it in GGUF files (same forward as gemma3_text)",
    "phi3": "Phi-3 mini/medium 4K (fused qkv and gate/up projections, partial rotary, sliding window)",
}
GEMMA3 = ("gemma3_text", "gemma3")  # HF model_type, GGUF general.architecture


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE, of one of two kinds (HF ``rope_type``):

    * ``"llama3"``: Llama 3.x, long wavelengths divided by ``factor``, short ones
      kept, a smooth ramp between (Meta's Llama 3.1 release; HF
      ``_compute_llama3_parameters``); uses every field.
    * ``"linear"``: position interpolation (Chen et al. 2023), every frequency
      divided by ``factor`` (HF ``_compute_linear_scaling_rope_parameters``; Gemma 3's
      global layers, factor 8 from 4B up); uses ``factor`` only.
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: Literal["llama3", "linear"] = "llama3"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RopeScaling | None:
        """From HF ``rope_scaling`` / ``rope_parameters`` (``None`` for the default RoPE).

        Raises:
            LongKVError: a RoPE type longkv does not implement (yarn, dynamic, ...).
        """
        if not isinstance(params, Mapping):
            return None
        kind = params.get("rope_type", params.get("type"))
        if kind in (None, "default"):
            return None
        if kind == "linear":
            return cls(factor=float(params["factor"]), kind="linear")
        if kind == "llama3":
            return cls(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position=int(params["original_max_position_embeddings"]),
            )
        raise LongKVError(f"RoPE scaling {kind!r} in the model config is not supported: longkv implements llama3 and linear")


@dataclass(frozen=True)
class AttnSpec:
    """How one layer attends: its RoPE and which cached keys a query may see.

    Attributes:
        rope_theta: RoPE base frequency of this layer.
        rope_scaling: Llama 3.x RoPE scaling of this layer, if any.
        window: sliding-window attention (Mistral; Gemma's local layers): a query at
            position p sees the keys at positions ``p - window < k <= p`` (``window``
            tokens, itself included), as transformers' ``sliding_window``. ``None``:
            global attention (every earlier key, under the KV policy).
    """

    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    window: int | None = None

    @property
    def sliding(self) -> bool:
        return self.window is not None


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer.

    Attributes:
        arch: architecture family, a key of ``SUPPORTED_ARCHITECTURES``.
        vocab_size: number of token ids.
        hidden_size: model width (residual stream), e.g. 576 for SmolLM2-135M.
        intermediate_size: width of the gated MLP.
        n_layers: decoder layers.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when smaller than ``n_heads``).
        head_dim: channels per head.
        rope_theta: RoPE base frequency.
        rms_eps: epsilon of RMSNorm.
        max_position: trained context window in tokens (the longest relative
            distance the model has seen).
        tie_embeddings: the LM head reuses the token embedding matrix.
        attention_bias: q/k/v projections carry biases (Qwen2).
        qk_norm: every query and key head is RMS-normalised (its own weight, (head_dim,))
            before RoPE (Qwen3).
        bos_token_id / eos_token_ids: special token ids (eos may be several).
        rope_scaling: RoPE scaling (Llama 3.x or linear), if any.
        attn_scale: multiplier of q.k before the softmax; ``None``: ``head_dim ** -0.5``, what the
            engine's attention applies (Gemma 3: ``query_pre_attn_scalar ** -0.5``; a model whose
            scale differs folds the ratio into its queries, so attention and policies see it too).
        final_softcap: logits become ``c * tanh(logits / c)`` (Gemma 2's final softcapping), if set.
        rotary_dim: channels of each head that RoPE rotates (the first ``rotary_dim``; partial rotary,
            HF ``partial_rotary_factor``); ``None``: all of ``head_dim``.
        sliding_window: the window of sliding layers (see :class:`AttnSpec`), if any.
        layers: one :class:`AttnSpec` per layer; by default every layer global (or
            sliding when ``sliding_window`` is set) with ``rope_theta`` and
            ``rope_scaling``. The engine reads a layer's spec (:meth:`attn`), never one
            model-wide RoPE, so a family with mixed layers only declares them here.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling | None = None
    attn_scale: float | None = None
    final_softcap: float | None = None
    rotary_dim: int | None = None
    sliding_window: int | None = None
    layers: tuple[AttnSpec, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise LongKVError(
                f"unsupported architecture {self.arch!r}: longkv runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (see `longkv models`)"
            )
        assert self.n_heads % self.n_kv_heads == 0, "GQA needs n_heads divisible by n_kv_heads"
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise LongKVError(f"rotary dimension {self.rotary_dim} in the model config: it must be even and in (0, head_dim={self.head_dim}]")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LongKVError(f"sliding window of {self.sliding_window} tokens in the model config: it must be at least 1")
        if not self.layers:
            spec = AttnSpec(self.rope_theta, self.rope_scaling, self.sliding_window)
            object.__setattr__(self, "layers", (spec,) * self.n_layers)
        assert len(self.layers) == self.n_layers, "one AttnSpec per layer"

    def attn(self, layer: int) -> AttnSpec:
        """The attention spec of ``layer`` (RoPE, global or sliding)."""
        return self.layers[layer]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, in float32 (dtype size 4)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict.

        Raises:
            LongKVError: the ``model_type`` is not supported.
        """
        arch = str(cfg.get("model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LongKVError(
                f"unsupported model_type {arch!r} in config.json: longkv runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (see `longkv models`)"
            )
        if arch == "gemma3":  # in config.json, "gemma3" is the image-text model (Gemma3ForConditionalGeneration)
            raise LongKVError(
                "model_type 'gemma3' in config.json is Gemma 3's image-text checkpoint: longkv runs the text model "
                "(model_type gemma3_text, e.g. gemma-3-270m or gemma-3-1b) or a Gemma 3 GGUF file"
            )
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        scaling = None
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        if isinstance(rs, Mapping) and rs.get("rope_type", rs.get("type")) in ("llama3", "linear"):
            scaling = RopeScaling.from_params(rs)
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rs, Mapping):
            theta = rs.get("rope_theta")
        theta = float(theta if theta is not None else 10000.0)
        n_layers = int(cfg["num_hidden_layers"])
        window = cfg.get("sliding_window")
        window = int(window) if window else None
        layer_types = cfg.get("layer_types")
        if window is not None and arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None  # Qwen configs carry a window they do not use
        layers: tuple[AttnSpec, ...] = ()
        if window is not None and isinstance(layer_types, list) and len(layer_types) == n_layers:
            layers = tuple(AttnSpec(theta, scaling, window if t == "sliding_attention" else None) for t in layer_types)
        extra: dict[str, Any] = {}
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        if arch == "phi3" and isinstance(rs, Mapping) and rs.get("rope_type", rs.get("type")) not in (None, "default", "llama3", "linear"):
            raise LongKVError(f"this Phi model uses {rs.get('rope_type', rs.get('type'))} RoPE scaling (a 128K-context variant), which longkv does not implement: use a 4K-context variant")
        factor = float(cfg.get("partial_rotary_factor", 1.0))
        if factor < 1.0:
            extra["rotary_dim"] = int(head_dim * factor)
        if arch in GEMMA3:
            layers, window, extra = _gemma3_hf(cfg, n_layers)
            full = next((spec for spec in layers if not spec.sliding), layers[0])  # the model-wide RoPE: the global layers'
            theta, scaling = full.rope_theta, full.rope_scaling
        return cls(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rope_theta=theta,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch in GEMMA3)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", *GEMMA3),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=scaling,
            sliding_window=window,
            layers=layers,
            name=name,
            **extra,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str], name: str = "") -> ModelConfig:
        """Build from GGUF metadata (``general.architecture``, ``<arch>.block_count``, ...).

        Args:
            meta: GGUF key -> decoded value.
            tensor_names: names of the tensors in the file (to see whether the
                LM head is tied to the embeddings).

        Raises:
            LongKVError: the architecture is not supported.
        """
        arch = str(meta.get("general.architecture", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LongKVError(
                f"unsupported GGUF architecture {arch!r}: longkv runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (see `longkv models`)"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        vocab = get("vocab_size")
        if vocab is None:  # e.g. llama.cpp's Qwen2 files: the tokenizer's size
            vocab = meta.get("tokenizer.ggml.token_count") or len(meta.get("tokenizer.ggml.tokens", []))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        head_dim = get("attention.key_length") or hidden // n_heads
        window = get("attention.sliding_window")
        extra: dict[str, Any] = {}
        rot = get("rope.dimension_count")
        if rot is not None and int(rot) < int(head_dim):  # partial rotary (Phi-3's family from Phi-4-mini on)
            extra["rotary_dim"] = int(rot)
        if arch == "phi3" and ("rope_factors_long.weight" in tensor_names or get("rope.scaling.attn_factor") is not None):
            raise LongKVError("this Phi GGUF uses LongRoPE (a 128K-context variant), which longkv does not implement: use a 4K-context variant")
        if arch in GEMMA3:
            extra = _gemma3_gguf(get, int(get("block_count")), hidden, n_heads, int(head_dim))
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(head_dim),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(get("context_length", 4096)),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(eos_ids),
            sliding_window=int(window) if window else None,
            name=name,
            **extra,
        )


# --------------------------------------------------------------------------- Gemma 3

GEMMA3_LOCAL_THETA = 10_000.0  # RoPE base of Gemma 3's sliding layers (HF rope_local_base_freq; fixed in llama.cpp)
GEMMA3_PATTERN = 6  # every 6th layer global, the 5 before it sliding (HF sliding_window_pattern; llama.cpp's swa pattern)


def _gemma3_layers(types: list[str], window: int, full: AttnSpec, local_theta: float,
                   local_scaling: RopeScaling | None = None) -> tuple[AttnSpec, ...]:
    """One spec per layer from HF ``layer_types`` ("sliding_attention" / "full_attention")."""
    local = AttnSpec(local_theta, local_scaling, window)
    return tuple(local if t == "sliding_attention" else full for t in types)


def _gemma3_types(n_layers: int, pattern: int = GEMMA3_PATTERN) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def _gemma3_hf(cfg: Mapping[str, Any], n_layers: int) -> tuple[tuple[AttnSpec, ...], int, dict[str, Any]]:
    """Per-layer specs, the sliding window and the extra ModelConfig fields of a gemma3_text config.json.

    Two file formats: transformers >= 5 writes ``rope_parameters`` per layer type
    (``{"full_attention": {"rope_theta", "rope_type", "factor"}, "sliding_attention": {...}}``);
    the hub's files (transformers 4.x) carry ``rope_theta`` and ``rope_scaling`` for the
    global layers and ``rope_local_base_freq`` for the sliding ones.

    Raises:
        LongKVError: bidirectional attention (EmbeddingGemma) or attention-logit softcapping,
            which the engine does not implement; an unsupported RoPE scaling.
    """
    if cfg.get("use_bidirectional_attention"):
        raise LongKVError("this Gemma 3 config uses bidirectional attention (an embedding model): longkv runs causal decoders")
    if cfg.get("attn_logit_softcapping") is not None:
        raise LongKVError("attention-logit softcapping (attn_logit_softcapping) is not supported by longkv's attention")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and ("full_attention" in rp or "sliding_attention" in rp):
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta") or 1_000_000.0}
        local = {"rope_theta": cfg.get("rope_local_base_freq") or GEMMA3_LOCAL_THETA}
    types = cfg.get("layer_types")
    if not (isinstance(types, list) and len(types) == n_layers):
        types = _gemma3_types(n_layers, int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or GEMMA3_PATTERN))
    window = int(cfg.get("sliding_window") or 4096)  # transformers' default
    spec = AttnSpec(float(full.get("rope_theta") or 1_000_000.0), RopeScaling.from_params(full), None)
    layers = _gemma3_layers(types, window, spec, float(local.get("rope_theta") or GEMMA3_LOCAL_THETA),
                            RopeScaling.from_params(local))
    extra = {
        "attn_scale": float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,  # transformers' default 256
        "final_softcap": float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") is not None else None,
    }
    return layers, window, extra


def _gemma3_gguf(get: Callable[..., Any], n_layers: int, hidden: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """ModelConfig fields of a Gemma 3 GGUF beyond the common keys, as llama.cpp reads the file.

    llama.cpp fixes what the file does not say: sliding layers use RoPE base 10 000 without
    scaling, global layers ``rope.freq_base`` with ``rope.scaling.*``, every 6th layer global;
    the attention scale is ``head_dim ** -0.5`` except for the 27B (62 layers), whose
    ``query_pre_attn_scalar`` is ``hidden / heads`` (168; Google's gemma_pytorch config).
    """
    if get("attn_logit_softcapping") is not None:
        raise LongKVError("attention-logit softcapping (attn_logit_softcapping) is not supported by longkv's attention")
    window = int(get("attention.sliding_window") or 4096)
    scaling = None
    if get("rope.scaling.type") == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0:
        scaling = RopeScaling(factor=float(get("rope.scaling.factor")), kind="linear")
    elif get("rope.scaling.type") not in (None, "none", "linear"):
        raise LongKVError(f"RoPE scaling {get('rope.scaling.type')!r} in the GGUF file is not supported: longkv implements linear")
    full = AttnSpec(float(get("rope.freq_base", 1_000_000.0)), scaling, None)
    local_theta = float(get("rope.freq_base_swa", GEMMA3_LOCAL_THETA))
    scalar = hidden / n_heads if n_layers == 62 else head_dim
    softcap = get("final_logit_softcapping")
    return {
        "layers": _gemma3_layers(_gemma3_types(n_layers), window, full, local_theta),
        "rope_scaling": scaling,
        "attn_scale": float(scalar) ** -0.5,
        "final_softcap": float(softcap) if softcap is not None else None,
    }


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model.

    Attributes:
        chunk_size: prefill chunk in tokens; peak KV under an eviction policy is
            ``budget + chunk_size`` tokens per layer.
        page_size: tokens per KV page.
        dtype: compute dtype name, ``"float32"`` or ``"bfloat16"``.
        threads: torch intra-op threads (``None``: all cores).
        progress_min_tokens: show a prefill progress bar from this many prompt tokens.
        device: where weights, KV pages and every activation live: ``"cpu"``, ``"cuda"``
            or ``"cuda:N"`` (see :func:`check_device`).
    """

    chunk_size: int = 512
    page_size: int = 64
    dtype: str = "float32"
    threads: int | None = None
    progress_min_tokens: int = 2048
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise LongKVError(f"chunk size must be at least 1 token, got {self.chunk_size}: pass e.g. --chunk-size 512")
        if self.page_size < 1:
            raise LongKVError(f"page size must be at least 1 token, got {self.page_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise LongKVError(f"unknown dtype {self.dtype!r}: use float32 or bfloat16")
        object.__setattr__(self, "device", check_device(self.device))


def fast_bf16_matmul(device: str | object = "cpu") -> bool:
    """Whether bfloat16 matrix products run at full speed on ``device``.

    True on CUDA and on CPUs with native bfloat16 dot products (AVX512-BF16 or AMX).
    On other CPUs (AVX2 only) torch's bfloat16 GEMM and batched matmul fall back to a
    slow path: measured here on such a CPU, a (512 x 576) x (576 x 1536) product took
    61 ms in bfloat16 and 6.4 ms in float32, a decode step's (3, 2100, 64) key read
    550 us against 35 us to up-cast plus 90 us in float32. There the model multiplies
    in float32 (weights and KV stay bfloat16 in memory).
    """
    import torch

    dev = torch.device(str(device))
    if dev.type != "cpu":
        return True
    return _cpu_bf16()


@functools.cache
def _cpu_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def check_device(name: str) -> str:
    """The canonical name of a device the engine can run on (``"cpu"``, ``"cuda:0"``, ...).

    ``"cuda"`` means the current CUDA device.

    Raises:
        LongKVError: not cpu/cuda[:N], or no such CUDA device visible to this torch build.
    """
    import torch  # config stays importable without torch for the CLI's fast paths

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise LongKVError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise LongKVError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise LongKVError(
            f"device {name!r}: no CUDA GPU is visible to this torch ({torch.__version__}, {build}): "
            "install a CUDA build of torch (README, 'On a GPU') or use --device cpu"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise LongKVError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return f"cuda:{index}"
