"""Every registered architecture family, from both sources, against transformers.

For each family longkv registers, a tiny random model (:data:`TINY_SPECS`) is saved as an HF
folder and written as a GGUF file by ``tests/gguf_writer.py`` (llama.cpp's layout). longkv loads
each source in float32 and must give transformers' logits on the HF folder over 100 positions
(sliding windows of 16-24 tokens are crossed several times) and its greedy tokens after a prefill
in chunks of 16. Separately, transformers itself reads the GGUF files: that checks the writer
against llama.cpp's conventions without going through longkv's loader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf_model
from gguf_writer import GGUF_ARCH, gguf_equivalent_overrides, gguf_tensor_name, write_gguf

from longkv import LLM
from longkv.engine.runner import Runner
from longkv.errors import LongKVError
from longkv.policies import DensePolicy

pytestmark = pytest.mark.filterwarnings("ignore")

# HF model_type -> config fields of its tiny random model (conftest.make_tiny_hf_model: hidden 64,
# 4 query heads, 2 KV heads, vocab 300, 2 layers unless stated).
TINY_SPECS: dict[str, dict[str, Any]] = {
    "llama": {"seed": 1},
    "mistral": {"seed": 5, "sliding_window": 24},
    "qwen2": {"seed": 0},  # q/k/v biases (random, see make_tiny_hf_model)
    "qwen3": {"seed": 2, "head_dim": 24},  # QK-norm, head_dim != hidden / heads
    "gemma3_text": {  # 5 sliding layers (16 tokens) then a global one, two RoPE bases, linear scaling x4
        "seed": 8, "num_hidden_layers": 6, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        },
        "pad_token_id": 0, "tie_word_embeddings": True,
    },
    "phi3": {"seed": 11, "partial_rotary_factor": 0.5, "sliding_window": 24, "pad_token_id": 0},  # fused qkv, gate_up
}  # fmt: skip
N_POSITIONS = 100
PROMPT_LEN = 70
N_NEW = 20
CHUNK = 16
TEXT = "The quick brown fox jumps over the lazy dog. Alice was tired; def main(): pass -- 1234 déjà vu"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who jumps?"}]


def registered_model_types() -> list[str]:
    """HF ``model_type`` of every family in longkv's registry (a family's GGUF name maps to it)."""
    from longkv.models import FAMILIES

    return sorted({fam.model_type for fam in FAMILIES})


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


IDS = _ids(N_POSITIONS, 21)
PROMPT = _ids(PROMPT_LEN, 22)


@pytest.fixture(scope="module", autouse=True)
def _longkv_home(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """GGUF tokenizers are cached under $LONGKV_HOME: a fresh one for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGKV_HOME", str(tmp_path_factory.mktemp("longkv-home")))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``model_type`` -> (HF folder, GGUF file) of its tiny model, built once per module."""

    @cache
    def build(model_type: str) -> tuple[Path, Path]:
        spec = dict(TINY_SPECS[model_type])
        folder = make_tiny_hf_model(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type, **spec)
        gguf_file = write_gguf(folder, tmp_path_factory.mktemp(f"gguf-{model_type}") / f"tiny-{model_type}.f32.gguf")
        return folder, gguf_file

    return build


def _hf_config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text()))


@cache
def _transformers_model(folder: Path, overrides: tuple[tuple[str, Any], ...] = ()):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **dict(overrides)).eval()


@cache
def _reference(folder: Path, overrides: tuple[tuple[str, Any], ...] = ()) -> tuple[torch.Tensor, list[int]]:
    """transformers on the HF folder (config fields overridden): logits over IDS, greedy tokens after PROMPT."""
    model = _transformers_model(folder, overrides)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float()
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return logits, out[0, PROMPT_LEN:].tolist()


def _expected_windows(folder: Path, overrides: dict[str, Any]) -> list[int | None]:
    """Per layer, the sliding window transformers' config gives it (None: global)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder), **overrides)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    return [window if t == "sliding_attention" else None for t in types]


def _logits_all(llm: LLM, ids: list[int]) -> torch.Tensor:
    runner = Runner(llm.model, DensePolicy(), llm.engine_config)
    return runner.logits_all(runner.new_sequence(len(ids)), ids)


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("model_type", registered_model_types())
def test_family_matches_transformers(model_type: str, source: str, tiny: Callable[[str], tuple[Path, Path]]) -> None:
    """longkv on the family's tiny model, from an HF folder or a GGUF file, against transformers on the folder:
    each layer's window as transformers configures it; logits at 100 positions within 1e-3 with the same argmax;
    20 greedy tokens after a 70-token prompt prefilled in chunks of 16 equal to transformers' generate; the same
    token ids, eos and chat prompt from the tokenizer. A GGUF file that cannot carry a config field (Mistral's
    sliding window) is compared with the model it does describe, and must differ from the original."""
    if model_type not in TINY_SPECS:
        pytest.fail(f"family {model_type!r} is registered but has no tiny model: add its config fields to TINY_SPECS in tests/test_families.py")
    from transformers import AutoTokenizer

    folder, gguf_file = tiny(model_type)
    overrides = gguf_equivalent_overrides(model_type, _hf_config(folder)) if source == "gguf" else {}
    ref_logits, ref_tokens = _reference(folder, tuple(sorted(overrides.items())))
    llm = LLM(model=gguf_file if source == "gguf" else folder, dtype="float32", chunk_size=CHUNK)

    assert [spec.window for spec in llm.config.layers] == _expected_windows(folder, overrides)
    ours = _logits_all(llm, IDS)
    assert ours.shape == ref_logits.shape == (N_POSITIONS, 300)
    assert (ours - ref_logits).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref_logits.argmax(-1))
    assert llm.generate(PROMPT, max_new_tokens=N_NEW, policy="dense", ignore_eos=True).token_ids == ref_tokens

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    assert llm.encode(TEXT) == hf_tok.encode(TEXT, add_special_tokens=False)
    assert llm.apply_chat_template(MESSAGES) == hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in llm.eos_ids
    if overrides:  # what the file cannot say changes the model: the original's logits are not these
        original, _ = _reference(folder)
        assert (ours - original).abs().max().item() > 1e-2


def test_every_tiny_spec_is_a_registered_family() -> None:
    """No spec for a family longkv no longer registers, and every spec has a GGUF architecture."""
    assert set(TINY_SPECS) <= set(registered_model_types())
    assert set(TINY_SPECS) <= set(GGUF_ARCH)


# --------------------------------------------------------------------------- the writer, checked by transformers


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_transformers_reads_the_gguf_alone_as_the_hf_model(model_type: str, tiny: Callable[[str], tuple[Path, Path]]) -> None:
    """transformers builds config and weights from the GGUF file alone (metadata keys, q/k row order, tokenizer
    ids) and gives the HF folder's logits (Mistral: without its window, which the file does not carry). The other
    families carry metadata transformers does not read (qwen3's key_length, phi3's rope.dimension_count and
    sliding_window, gemma3's rope scaling)."""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from transformers import AutoModelForCausalLM

    folder, gguf_file = tiny(model_type)
    overrides = gguf_equivalent_overrides(model_type, _hf_config(folder))
    ref, _ = _reference(folder, tuple(sorted(overrides.items())))
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].float()
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_transformers_reads_the_gguf_tensors_as_the_hf_weights(model_type: str, tiny: Callable[[str], tuple[Path, Path]]) -> None:
    """transformers, given the HF config, loads the weights from the GGUF file (llama.cpp names, q/k row order,
    Gemma's 1 + w norms, Phi-3's fused tensors) and gives the HF folder's logits. (transformers cannot map a
    ``mistral`` model onto GGUF names; its tensors are llama's, checked above.)"""
    pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, gguf_file = tiny(model_type)
    ref, _ = _reference(folder)
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, config=config, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].float()
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(("dtype", "bits", "tol"), [("f16", 16, 2e-3), ("q8_0", 8, 3e-2)])
def test_16_and_8_bit_gguf_read_as_transformers_reads_them(
    dtype: str, bits: int, tol: float, tiny: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    """A Llama GGUF with F16 or Q8_0 matrices (norms stay F32): longkv reports the bits each tensor was stored with
    and gives the logits transformers gives from the same file; both stay near the float32 model, but not on it."""
    pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM

    from longkv import loading

    folder, _ = tiny("llama")
    gguf_file = write_gguf(folder, tmp_path / f"tiny-llama.{dtype}.gguf", dtype=dtype)
    loaded = loading.load(gguf_file)
    assert loaded.weight_bits["model.layers.0.self_attn.q_proj.weight"] == bits
    assert loaded.weight_bits["model.layers.0.input_layernorm.weight"] == 32
    ours = _logits_all(LLM(model=gguf_file, dtype="float32"), IDS)
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_file.name, config=AutoConfig.from_pretrained(str(folder)), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-5
    assert 1e-5 < (ours - _reference(folder)[0]).abs().max().item() < tol


@pytest.mark.parametrize("model_type", sorted(TINY_SPECS))
def test_gguf_metadata_as_transformers_reads_it(model_type: str, tiny: Callable[[str], tuple[Path, Path]]) -> None:
    """The shape transformers reads from each GGUF file's metadata is the HF config's (sizes, context, eps, RoPE
    base of the global layers, vocabulary, tied head), and the tokenizer it builds from the file encodes as the
    folder's does."""
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf_file = tiny(model_type)
    got = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    want = AutoConfig.from_pretrained(str(folder))
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "max_position_embeddings", "vocab_size", "tie_word_embeddings")  # fmt: skip
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32

    def theta(cfg: Any) -> float:
        rp = cfg.rope_parameters
        return float(rp.get("full_attention", rp)["rope_theta"])

    assert theta(got) == theta(want)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert tok.encode(TEXT, add_special_tokens=False) == AutoTokenizer.from_pretrained(str(folder)).encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize("model_type", sorted(TINY_SPECS))
def test_writer_tensor_names_are_llama_cpps(model_type: str, tiny: Callable[[str], tuple[Path, Path]]) -> None:
    """Every tensor name the writer gives is the one gguf-py's own table (llama.cpp's) gives that HF parameter."""
    import gguf
    from safetensors import safe_open

    folder, _ = tiny(model_type)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == GGUF_ARCH[model_type])
    table = gguf.get_tensor_name_map(arch, int(_hf_config(folder)["num_hidden_layers"]))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert len(names) >= 10
    for name in names:
        assert gguf_tensor_name(name, model_type) == table.get_name(name, try_suffixes=(".weight", ".bias")), name


def test_llama3_rope_factors_are_transformers_frequency_ratios(tmp_path: Path) -> None:
    """A Llama 3.x model's RoPE scaling goes into the file as ``rope_freqs``, one divisor per frequency (llama.cpp
    divides each frequency by it): transformers' unscaled inverse frequencies over its llama3-scaled ones."""
    from gguf import GGUFReader
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    folder = make_tiny_hf_model(tmp_path / "hf", "llama", seed=1, rope_parameters=rope)
    reader = GGUFReader(str(write_gguf(folder, tmp_path / "gguf" / "m.gguf")))
    factors = np.asarray(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data, dtype=np.float64)
    cfg = AutoConfig.from_pretrained(str(folder))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert factors.shape == (8,) and factors.max() == 8.0 and factors.min() == 1.0
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- loader findings


def test_llama3_rope_scaling_from_gguf_matches_transformers(tmp_path: Path) -> None:
    """A tiny Llama with Llama 3.x RoPE scaling (original context 64, factor 8) gives the same logits from its GGUF
    file as transformers on the HF folder."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    folder = make_tiny_hf_model(tmp_path / "hf", "llama", seed=1, rope_parameters=rope)
    ref = _transformers_model(folder)(torch.tensor([IDS])).logits[0].detach()
    ours = _logits_all(LLM(model=write_gguf(folder, tmp_path / "gguf" / "m.gguf"), dtype="float32"), IDS)
    assert (ours - ref).abs().max().item() < 1e-3


def test_phi3_longrope_from_gguf_matches_transformers(tmp_path: Path) -> None:
    """A tiny Phi-3.5-shaped model (LongRoPE over 4x an original 32 tokens, partial rotary 0.5) written as llama.cpp
    writes it (factor tensors, attn_factor) gives transformers' logits over 100 tokens, past the original context."""
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.2, 2.0, 3.5, 6.0]}
    folder = make_tiny_hf_model(tmp_path / "hf", "phi3", seed=14, max_position=128, partial_rotary_factor=0.5,
                                pad_token_id=0, original_max_position_embeddings=32, rope_scaling=rope)  # fmt: skip
    ref = _transformers_model(folder)(torch.tensor([IDS])).logits[0].detach()
    llm = LLM(model=write_gguf(folder, tmp_path / "gguf" / "m.gguf"), dtype="float32")
    assert llm.config.rope_scaling is not None and llm.config.rope_scaling.long_factor == pytest.approx((1.2, 2.0, 3.5, 6.0))
    ours = _logits_all(llm, IDS)
    assert len(IDS) > 32 and (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def _drop(*names: str) -> Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]:
    return lambda name, arr: [] if name in names else [(name, arr)]


def _rename(old: str, new: str) -> Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]:
    return lambda name, arr: [(new if name == old else name, arr)]


def _add_after_embedding(extra: str) -> Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]:
    return lambda name, arr: [(name, arr), (extra, np.ones((64, 64), np.float32))] if name == "token_embd.weight" else [(name, arr)]


def _cut_rows(name: str, rows: int) -> Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]:
    return lambda n, arr: [(n, arr[:rows] if n == name else arr)]


@pytest.mark.parametrize(
    ("model_type", "edit", "message"),
    [
        pytest.param("llama", _rename("blk.0.attn_q.weight", "blk.0.attn_query.weight"), r"attn_query\.weight is not one the llama forward reads", id="renamed-q"),
        pytest.param("llama", _drop("blk.1.ffn_down.weight"), r"model\.layers\.1\.mlp\.down_proj\.weight", id="missing-ffn_down"),
        pytest.param("llama", _drop("token_embd.weight"), r"model\.embed_tokens\.weight", id="missing-token_embd"),
        pytest.param("qwen2", _drop("blk.1.attn_v.bias"), r"model\.layers\.1\.self_attn\.v_proj\.bias", id="missing-later-bias"),
        pytest.param("gemma3_text", _drop("blk.3.post_ffw_norm.weight"), r"post_feedforward_layernorm", id="missing-gemma3-norm"),
        pytest.param("phi3", _drop("blk.1.attn_qkv.weight"), r"qkv_proj", id="missing-phi3-qkv"),
        pytest.param("llama", _drop("output_norm.weight"), r"model\.norm\.weight|output_norm", id="missing-output_norm"),
        pytest.param("qwen3", _drop("blk.0.attn_q_norm.weight"), r"q_norm", id="missing-block0-q_norm"),
        pytest.param("qwen2", _drop("blk.0.attn_q.bias"), r"q_proj\.bias|attn_q\.bias", id="missing-block0-bias"),
        pytest.param("llama", _add_after_embedding("blk.0.attn_gate.weight"), r"attn_gate", id="unknown-tensor"),
        pytest.param("llama", _cut_rows("blk.0.attn_k.weight", 16), r"blk\.0\.attn_k\.weight .*shape 16x64.*implies 32x64", id="wrong-shape"),
    ],
)  # fmt: skip
def test_gguf_with_a_missing_or_unexpected_tensor_is_refused(
    model_type: str, edit: Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]], message: str,
    tiny: Callable[[str], tuple[Path, Path]], tmp_path: Path,
) -> None:
    """A GGUF file whose tensors do not match its architecture fails to load with a LongKVError naming the tensor."""
    folder, _ = tiny(model_type)
    broken = write_gguf(folder, tmp_path / "broken.gguf", edit=edit)
    with pytest.raises(LongKVError, match=message):
        LLM(model=broken, dtype="float32")
