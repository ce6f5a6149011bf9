"""Frozen configuration dataclasses: what a model is, and how the engine runs it.

:class:`ModelConfig` is built either from a Hugging Face ``config.json`` dict
(:meth:`ModelConfig.from_hf_config`) or from the metadata of a GGUF file
(:meth:`ModelConfig.from_gguf`); both give the same object for the same model.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longkv.errors import LongKVError


def longkv_home() -> Path:
    """Cache root: ``$LONGKV_HOME`` or ``~/.cache/longkv`` (models, tokenizers, KV tiers, agent runs)."""
    return Path(os.environ.get("LONGKV_HOME", Path.home() / ".cache" / "longkv")).expanduser()

ASK_DRY_MULTIPLIER = 0.8  # the loop guard (DRY) of ``longkv ask`` and ``LLM.ask``: benchmarks/loops.py

@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE, of one of four kinds (HF ``rope_type``, or llama.cpp's):

    * ``"llama3"``: Llama 3.x, long wavelengths divided by ``factor``, short ones
      kept, a smooth ramp between (Meta's Llama 3.1 release; HF
      ``_compute_llama3_parameters``); uses ``factor``, the two freq factors and
      ``original_max_position``.
    * ``"linear"``: position interpolation (Chen et al. 2023), every frequency
      divided by ``factor`` (HF ``_compute_linear_scaling_rope_parameters``; Gemma 3's
      global layers, factor 8 from 4B up); uses ``factor`` only.
    * ``"longrope"``: LongRoPE (Ding et al. 2024; Phi-3 128K, Phi-3.5, Phi-4-mini): frequency
      ``i`` divided by ``long_factor[i]`` (one per rotated channel pair), and the rotated
      channels' q.k multiplied by ``attention_factor ** 2`` (HF multiplies cos and sin by
      it; longkv folds it into the queries' rotated channels). The model also
      ships ``short_factor`` for sequences within ``original_max_position``, which
      transformers switches to below that length; longkv rotates every position with
      the long factors, so cached keys keep one rotation however long the sequence grows
      (llama.cpp likewise picks one set per context size).
    * ``"freq_factors"``: frequency ``i`` divided by ``freq_factors[i]``, as llama.cpp stores
      a Llama 3.x scaling in GGUF files (the ``rope_freqs`` tensor: the same frequencies as
      ``"llama3"``, written out).
    """

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    kind: Literal["llama3", "linear", "longrope", "freq_factors"] = "llama3"
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    freq_factors: tuple[float, ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, max_position: int = 0, original_max_position: int | None = None) -> RopeScaling | None:
        """From HF ``rope_scaling`` / ``rope_parameters`` (``None`` for the default RoPE).

        ``max_position`` / ``original_max_position``: the config's ``max_position_embeddings``
        and ``original_max_position_embeddings`` (LongRoPE's scale and attention factor).

        Raises:
            LongKVError: a RoPE type longkv does not implement (yarn, dynamic, ...), or LongRoPE
                without its factors.
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
        if kind in ("longrope", "su"):  # "su": the name in the first Phi-3 128K configs
            orig = int(params.get("original_max_position_embeddings") or original_max_position or 0)
            long_f, short_f = params.get("long_factor"), params.get("short_factor")
            if not orig or not long_f or not short_f:
                raise LongKVError("LongRoPE scaling in the model config lacks long_factor, short_factor or "
                                  "original_max_position_embeddings: the config.json is incomplete")
            scale = float(params.get("factor") or (max_position / orig if max_position else 1.0))
            return cls.longrope(tuple(map(float, long_f)), tuple(map(float, short_f)), scale, orig, params.get("attention_factor"))
        raise LongKVError(f"RoPE scaling {kind!r} in the model config is not supported: longkv implements llama3, linear and "
                          "longrope; remove rope_scaling from config.json to run with the base RoPE (exact within the original context)")

    @classmethod
    def longrope(cls, long_factor: tuple[float, ...], short_factor: tuple[float, ...], scale: float,
                 original_max_position: int, attention_factor: float | None = None) -> RopeScaling:
        """LongRoPE over ``scale`` times the original context (Phi-3.5: 131072 / 4096 = 32);
        ``attention_factor`` by default ``sqrt(1 + ln(scale) / ln(original))`` (1 when ``scale <= 1``), as the
        Phi-3 configs and transformers define it."""
        if attention_factor is None:
            attention_factor = math.sqrt(1 + math.log(scale) / math.log(original_max_position)) if scale > 1 else 1.0
        return cls(factor=scale, original_max_position=original_max_position, kind="longrope",
                   long_factor=long_factor, short_factor=short_factor, attention_factor=float(attention_factor))


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
        arch: architecture family: the HF ``model_type`` of a registered
            :class:`~longkv.models.family.Family` (a GGUF architecture name is turned into it).
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
        rope_scaling: RoPE scaling (Llama 3.x, linear or LongRoPE), if any.
        attn_scale: multiplier of q.k before the softmax; ``None``: ``head_dim ** -0.5``, what the
            engine's attention applies (Gemma 3: ``query_pre_attn_scalar ** -0.5``). A model whose
            scale differs folds the ratio into its queries, so attention and policies see it too
            (as it does LongRoPE's attention factor, :class:`RopeScaling`).
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
        from longkv.models.family import family_of

        object.__setattr__(self, "arch", family_of(self.arch).model_type)
        assert self.n_heads % self.n_kv_heads == 0, "GQA needs n_heads divisible by n_kv_heads"
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise LongKVError(f"rotary dimension {self.rotary_dim} in the model config: it must be even and in (0, head_dim={self.head_dim}]")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LongKVError(f"sliding window of {self.sliding_window} tokens in the model config: it must be at least 1")
        if not self.layers:
            spec = AttnSpec(self.rope_theta, self.rope_scaling, self.sliding_window)
            object.__setattr__(self, "layers", (spec,) * self.n_layers)
        assert len(self.layers) == self.n_layers, "one AttnSpec per layer"
        pairs = (self.rotary_dim or self.head_dim) // 2
        for s in {spec.rope_scaling for spec in self.layers} - {None}:
            if s is not None and s.kind == "longrope" and not len(s.long_factor) == len(s.short_factor) == pairs:
                raise LongKVError(f"LongRoPE factors of length {len(s.long_factor)} / {len(s.short_factor)} in the model config: "
                                  f"there must be one per rotated channel pair ({pairs}); the config does not match the model")
            if s is not None and s.kind == "freq_factors" and len(s.freq_factors) != pairs:
                raise LongKVError(f"rope_freqs holds {len(s.freq_factors)} frequency factors, the model rotates {pairs} channel "
                                  "pairs: the file is inconsistent")

    def attn(self, layer: int) -> AttnSpec:
        """The attention spec of ``layer`` (RoPE, global or sliding)."""
        return self.layers[layer]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, in float32 (dtype size 4)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict: the keys every family shares here,
        the family's own through its :attr:`~longkv.models.family.Family.hf_config`.

        Raises:
            LongKVError: the ``model_type`` is not supported, or the config uses something the
                family's forward does not implement (the message says what).
        """
        from longkv.models.family import family_of

        fam = family_of(str(cfg.get("model_type", "")), "hf")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        n_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        max_position = int(cfg.get("max_position_embeddings", 4096))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        # raises for a scaling longkv does not implement (yarn, dynamic): running with the base RoPE would
        # silently differ from the model past its original context
        scaling = RopeScaling.from_params(rs, max_position, cfg.get("original_max_position_embeddings"))
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rs, Mapping):
            theta = rs.get("rope_theta")
        theta = float(theta if theta is not None else 10000.0)
        window = int(cfg["sliding_window"]) if cfg.get("sliding_window") else None
        layers: tuple[AttnSpec, ...] = ()
        layer_types = cfg.get("layer_types")
        if window is not None and isinstance(layer_types, list) and len(layer_types) == n_layers:
            layers = tuple(AttnSpec(theta, scaling, window if t == "sliding_attention" else None) for t in layer_types)
        factor = float(cfg.get("partial_rotary_factor", 1.0))
        fields: dict[str, Any] = dict(
            arch=fam.model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rope_theta=theta,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position=max_position,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=scaling,
            rotary_dim=int(head_dim * factor) if factor < 1.0 else None,
            sliding_window=window,
            layers=layers,
            name=name,
        )
        return cls(**fam.hf_config(cfg, fields))

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensors: Mapping[str, Any] | Collection[str], name: str = "") -> ModelConfig:
        """Build from GGUF metadata (``general.architecture``, ``<arch>.block_count``, ...): the keys
        every family shares here, the family's own through its
        :attr:`~longkv.models.family.Family.gguf_config`.

        Args:
            meta: GGUF key -> decoded value.
            tensors: the file's tensors, name -> array (or just their names: enough unless
                the family reads a tensor's values, e.g. LongRoPE's factors).

        Raises:
            LongKVError: the architecture is not supported, or the file uses something the
                family's forward does not implement.
        """
        from longkv.models.family import family_of

        arch = str(meta.get("general.architecture", ""))
        fam = family_of(arch, "gguf")

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
        head_dim = int(get("attention.key_length") or hidden // n_heads)
        window = get("attention.sliding_window")
        rot = get("rope.dimension_count")
        kind, factor = get("rope.scaling.type"), float(get("rope.scaling.factor", 1.0) or 1.0)
        if kind not in (None, "none", "linear"):
            raise LongKVError(f"RoPE scaling {kind!r} in the GGUF file is not supported: longkv implements linear (and Llama 3.x's "
                              "rope_freqs, Phi-3's LongRoPE); use a file converted without it")
        fields: dict[str, Any] = dict(
            arch=fam.model_type,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(get("context_length", 4096)),
            tie_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(eos_ids),
            rotary_dim=int(rot) if rot is not None and int(rot) < head_dim else None,  # partial rotary
            sliding_window=int(window) if window else None,
            rope_scaling=RopeScaling(factor=factor, kind="linear") if kind == "linear" and factor != 1.0 else None,
            name=name,
        )
        return cls(**fam.gguf_config(get, tensors, fields))


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
