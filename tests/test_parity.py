"""Logit parity with Hugging Face transformers on the same weights (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longkv import LLM
from longkv.engine.runner import Runner
from longkv.policies import DensePolicy, StreamingPolicy

pytestmark = pytest.mark.filterwarnings("ignore")


def _ours_all(llm: LLM, ids: list[int]) -> torch.Tensor:
    runner = Runner(llm.model, DensePolicy(), llm.engine_config)
    return runner.logits_all(runner.new_sequence(len(ids)), ids)


def _hf_logits(folder: Path, ids: list[int], gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_smollm2_gguf_matches_transformers(smollm2_f32: LLM, smollm2_path: Path, book_text: str) -> None:
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    ids = smollm2_f32.encode(book_text[20000:24000])[:300]
    assert len(ids) == 300
    ours = _ours_all(smollm2_f32, ids)
    ref = _hf_logits(smollm2_path.parent, ids, smollm2_path.name)
    assert ours.shape == ref.shape == (300, smollm2_f32.config.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3", "tiny_llama"])
def test_tiny_random_models_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    llm = LLM(model=folder, dtype="float32")
    assert llm.config.attention_bias == (fixture == "tiny_qwen2")
    assert llm.config.qk_norm == (fixture == "tiny_qwen3")
    ids = torch.randint(0, 300, (260,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = _ours_all(llm, ids)
    ref = _hf_logits(folder, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_sliding_window_matches_transformers(tiny_mistral: Path) -> None:
    """Mistral's sliding window (24 tokens) honoured: every layer's spec says so, and logits over 100 tokens (4x the
    window) match transformers, whose mask hides every key 24 or more positions back; a global read would not."""
    from longkv.config import AttnSpec

    llm = LLM(model=tiny_mistral, dtype="float32", chunk_size=16)
    assert llm.config.sliding_window == 24
    assert llm.config.layers == (AttnSpec(llm.config.rope_theta, None, 24),) * llm.config.n_layers
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = _hf_logits(tiny_mistral, ids)
    ours = _ours_all(llm, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    from dataclasses import replace

    glob = LLM(model=tiny_mistral, dtype="float32")
    glob.model.config = replace(glob.config, sliding_window=None, layers=())
    assert (_ours_all(glob, ids)[40:] - ref[40:]).abs().max().item() > 1e-2  # the window matters on this input


def test_sliding_window_chunked_prefill_and_batched_decode_match_transformers(tiny_mistral: Path) -> None:
    """Chunks of 16 (a chunk's band mask over the cache), then decode steps read only the window: the same greedy
    tokens as transformers' generate, alone and for three prompts decoded together in one batched step."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=tiny_mistral, dtype="float32", chunk_size=16)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (70, 45, 90)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral), dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False)
            refs.append(out[0, len(ids) :].tolist())
    assert llm.generate(prompts[0], max_new_tokens=30, policy="dense", ignore_eos=True).token_ids == refs[0]
    batch = llm.generate_batch(prompts, max_new_tokens=30, policy="dense", ignore_eos=True)
    assert [o.token_ids for o in batch] == refs


def test_tiny_qwen3_greedy_generation_matches_transformers(tiny_qwen3: Path) -> None:
    """Chunked prefill, then decode steps through the engine: the same greedy tokens as transformers' generate."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=tiny_qwen3, dtype="float32", chunk_size=48)
    ids = torch.randint(3, 300, (130,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = llm.generate(ids, max_new_tokens=24, policy="dense", ignore_eos=True).token_ids
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    assert ours == ref


def test_qwen3_gguf_metadata_reads_qk_norm_and_head_dim() -> None:
    from longkv.config import ModelConfig
    from longkv.loading import _hf_name

    meta = {
        "general.architecture": "qwen3", "qwen3.embedding_length": 1024, "qwen3.attention.head_count": 16,
        "qwen3.attention.head_count_kv": 8, "qwen3.attention.key_length": 128, "qwen3.block_count": 28,
        "qwen3.feed_forward_length": 3072, "qwen3.context_length": 40960, "qwen3.rope.freq_base": 1e6,
        "qwen3.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.token_count": 151936,
    }  # fmt: skip
    names = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}
    cfg = ModelConfig.from_gguf(meta, names)
    assert (cfg.arch, cfg.qk_norm, cfg.attention_bias, cfg.head_dim, cfg.n_heads * cfg.head_dim) == ("qwen3", True, False, 128, 2048)
    assert cfg.tie_embeddings and cfg.max_position == 40960 and cfg.rope_theta == 1e6
    assert _hf_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert _hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"


def test_chunked_prefill_equals_one_forward(smollm2_f32: LLM, book_text: str) -> None:
    ids = smollm2_f32.encode(book_text[:3000])[:400]
    full = _ours_all(smollm2_f32, ids)[-1]
    for chunk in (1000, 128, 37):
        llm = smollm2_f32
        runner = Runner(llm.model, DensePolicy(), type(llm.engine_config)(chunk_size=chunk))
        last = runner.prefill(runner.new_sequence(), ids)
        assert (last - full).abs().max().item() < 5e-4, chunk


def test_streaming_with_room_for_everything_equals_dense(smollm2_f32: LLM, book_text: str) -> None:
    ids = smollm2_f32.encode(book_text[:3000])[:500]
    full = _ours_all(smollm2_f32, ids)[-1]
    runner = Runner(smollm2_f32.model, StreamingPolicy(budget=1024), type(smollm2_f32.engine_config)(chunk_size=128))
    last = runner.prefill(runner.new_sequence(), ids)
    assert (last - full).abs().max().item() < 5e-4


def test_decode_matches_full_forward(smollm2_f32: LLM, book_text: str) -> None:
    """Logits of decode steps equal those of one forward over the same tokens."""
    ids = smollm2_f32.encode(book_text[5000:8000])[:200]
    full = _ours_all(smollm2_f32, ids)
    runner = Runner(smollm2_f32.model, DensePolicy(), smollm2_f32.engine_config)
    seq = runner.new_sequence()
    runner.prefill(seq, ids[:150])
    for i in range(150, 200):
        step = runner.decode(seq, ids[i])
        assert (step - full[i]).abs().max().item() < 5e-4


# --------------------------------------------------------------------------- Gemma 3


@pytest.fixture(scope="module")
def gemma3_f32(gemma3_path: Path) -> LLM:
    return LLM(model=gemma3_path, dtype="float32")


@pytest.fixture(scope="module")
def gemma3_ids(gemma3_f32: LLM, book_text: str) -> list[int]:
    """760 tokens of real book text after <bos> (Gemma is trained with it): past the 512-token window."""
    ids = [gemma3_f32.config.bos_token_id or 2, *gemma3_f32.encode(book_text[20000:26000])[:759]]
    assert len(ids) == 760
    return ids


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_path: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name, dtype=torch.float32).eval()


def test_gemma3_gguf_matches_transformers(gemma3_f32: LLM, gemma3_hf, gemma3_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Real Gemma 3 270M (sliding window 512, every 6th layer global): logits at every one of 760 positions equal
    transformers' on the same GGUF (up to the window, one past it, and 248 tokens past it: a causal forward's logits
    at position i do not depend on later tokens, so one pass covers every length)."""
    n = 760
    ids = gemma3_ids[:n]
    ours = _ours_all(gemma3_f32, ids)
    with torch.no_grad():
        ref = gemma3_hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (n, 262144)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # chunks of 200 (sliding layers read across chunk borders) end on the same logits
    runner = Runner(gemma3_f32.model, DensePolicy(), type(gemma3_f32.engine_config)(chunk_size=200))
    last = runner.prefill(runner.new_sequence(), ids)
    assert (last - ref[-1]).abs().max().item() < 1e-3


def test_gemma3_config_of_the_real_gguf(gemma3_f32: LLM) -> None:
    from longkv.config import AttnSpec

    c = gemma3_f32.config
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_size, c.head_dim, c.vocab_size) == ("gemma3_text", 18, 4, 1, 640, 256, 262144)
    local, full = AttnSpec(10000.0, None, 512), AttnSpec(1e6, None, None)
    assert c.layers == ((local,) * 5 + (full,)) * 3
    assert c.attn_scale == 256**-0.5 and c.final_softcap is None and c.tie_embeddings and c.qk_norm
    assert gemma3_f32.model.q_scale is None  # query_pre_attn_scalar == head_dim: no rescaling of q


def test_tiny_gemma3_matches_transformers(tiny_gemma3: Path) -> None:
    """Tiny random Gemma 3: 5 sliding layers (16 tokens, RoPE 10 K) and a global one (100 K, linear x4), attention
    scale 24 ** -0.5 with head_dim 16; logits over 100 tokens match, and each of those details matters here."""
    from dataclasses import replace

    from longkv.config import AttnSpec, RopeScaling

    llm = LLM(model=tiny_gemma3, dtype="float32")
    c = llm.config
    local, full = AttnSpec(10000.0, None, 16), AttnSpec(100000.0, RopeScaling(4.0, kind="linear"), None)
    assert c.arch == "gemma3_text" and c.layers == (local,) * 5 + (full,)
    assert c.attn_scale == 24**-0.5 and c.head_dim == 16 and c.qk_norm
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(9)).tolist()
    ref = _hf_logits(tiny_gemma3, ids)
    ours = _ours_all(llm, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    from longkv.config import EngineConfig
    from longkv.loading import load
    from longkv.models import Gemma3Model

    weights = load(tiny_gemma3).weights
    variants = {
        "every layer global": replace(c, layers=(replace(local, window=None),) * 5 + (full,)),
        "no linear scaling": replace(c, layers=(local,) * 5 + (replace(full, rope_scaling=None),)),
        "one RoPE base": replace(c, layers=(replace(local, rope_theta=100000.0),) * 5 + (full,)),
        "scale head_dim ** -0.5": replace(c, attn_scale=None),
    }
    for what, cfg in variants.items():
        runner = Runner(Gemma3Model(cfg, weights), DensePolicy(), EngineConfig())
        assert (runner.logits_all(runner.new_sequence(), ids) - ref).abs().max().item() > 1e-2, what


def test_tiny_gemma3_chunked_prefill_and_decode_match_transformers(tiny_gemma3: Path) -> None:
    """Chunks of 16 tokens (the sliding window) and decode steps 30 tokens past the window, alone and three
    prompts batched: the same greedy tokens as transformers' generate."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=tiny_gemma3, dtype="float32", chunk_size=16)
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (70, 45, 90)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3), dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False)
            refs.append(out[0, len(ids) :].tolist())
    assert llm.generate(prompts[0], max_new_tokens=30, policy="dense", ignore_eos=True).token_ids == refs[0]
    batch = llm.generate_batch(prompts, max_new_tokens=30, policy="dense", ignore_eos=True)
    assert [o.token_ids for o in batch] == refs


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Phi-3: fused qkv and gate/up projections, partial rotary (half of each head), a sliding window of 24."""
    from conftest import make_tiny_hf_model

    return make_tiny_hf_model(
        tmp_path_factory.mktemp("tiny-phi3"), "phi3", seed=11, partial_rotary_factor=0.5, sliding_window=24, pad_token_id=0,
    )  # fmt: skip


def test_tiny_phi3_matches_transformers(tiny_phi3: Path) -> None:
    """Logits over 100 tokens (4x the window) == transformers; greedy tokens after chunked prefill, alone and with
    two more prompts in one batched decode, == transformers' generate."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=tiny_phi3, dtype="float32", chunk_size=16)
    assert llm.config.arch == "phi3" and llm.config.rotary_dim == 8 and llm.config.sliding_window == 24
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(12)).tolist()
    ours, ref = _ours_all(llm, ids), _hf_logits(tiny_phi3, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (70, 45, 30)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    assert llm.generate(prompts[0], max_new_tokens=20, policy="dense", ignore_eos=True).token_ids == refs[0]
    assert [o.token_ids for o in llm.generate_batch(prompts, max_new_tokens=20, policy="dense", ignore_eos=True)] == refs


@pytest.fixture(scope="session")
def tiny_phi35(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Phi-3.5-shaped model: LongRoPE over 4x an original context of 32 tokens (its own factor
    per rotated channel pair, short and long), partial rotary 0.5, no sliding window."""
    from conftest import make_tiny_hf_model

    return make_tiny_hf_model(
        tmp_path_factory.mktemp("tiny-phi35"), "phi3", seed=14, max_position=128, partial_rotary_factor=0.5, pad_token_id=0,
        original_max_position_embeddings=32,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.2, 2.0, 3.5, 6.0]},
    )  # fmt: skip


def test_phi3_longrope_matches_transformers(tiny_phi35: Path) -> None:
    """LongRoPE (Phi-3.5, Phi-4-mini): over 100 tokens (past the original 32, where transformers rotates with
    the long factors) logits == transformers', and greedy tokens after chunked prefills of 40-70 tokens ==
    transformers' generate, alone and batched. The attention factor (sqrt(1 + ln 4 / ln 32)) scales the
    rotated channels only (half of each head here), as transformers' cos and sin do."""
    import math

    from transformers import AutoModelForCausalLM

    llm = LLM(model=tiny_phi35, dtype="float32", chunk_size=16)
    s = llm.config.rope_scaling
    assert s is not None and s.kind == "longrope" and s.long_factor == (1.2, 2.0, 3.5, 6.0) and s.original_max_position == 32
    af = math.sqrt(1 + math.log(4) / math.log(32))
    assert s.attention_factor == pytest.approx(af) and llm.config.attn_scale is None
    ids = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(15)).tolist()
    ours, ref = _ours_all(llm, ids), _hf_logits(tiny_phi35, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    g = torch.Generator().manual_seed(17)  # prompts whose greedy continuations never hit EOS (generate's min_new_tokens masks it)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (70, 45, 40)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi35), dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    assert [o.token_ids for o in llm.generate_batch(prompts, max_new_tokens=20, policy="dense", ignore_eos=True)] == refs


def test_longrope_config_errors() -> None:
    """LongRoPE without its factors, or with factors that do not match the rotated channels: one clear error each."""
    from longkv.config import ModelConfig
    from longkv.errors import LongKVError

    cfg = {"model_type": "phi3", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
           "intermediate_size": 128, "max_position_embeddings": 128, "original_max_position_embeddings": 32,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}  # fmt: skip
    assert ModelConfig.from_hf_config(cfg).rope_scaling.long_factor == (2.0,) * 8  # type: ignore[union-attr]
    with pytest.raises(LongKVError, match="one per rotated channel pair"):
        ModelConfig.from_hf_config({**cfg, "partial_rotary_factor": 0.5})
    with pytest.raises(LongKVError, match="lacks long_factor"):
        ModelConfig.from_hf_config({**cfg, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}})


def test_phi3_gguf_names_and_partial_rotary_metadata() -> None:
    """llama.cpp's phi3 tensors map to the fused HF names; rope.dimension_count below the head size is partial rotary."""
    from longkv.config import ModelConfig
    from longkv.loading import _hf_name

    assert _hf_name("blk.3.attn_qkv.weight", "phi3") == "model.layers.3.self_attn.qkv_proj.weight"
    assert _hf_name("blk.3.ffn_up.weight", "phi3") == "model.layers.3.mlp.gate_up_proj.weight"
    assert _hf_name("blk.3.ffn_up.weight", "llama") == "model.layers.3.mlp.up_proj.weight"
    meta = {"general.architecture": "phi3", "phi3.embedding_length": 3072, "phi3.attention.head_count": 24,
            "phi3.attention.head_count_kv": 8, "phi3.block_count": 32, "phi3.feed_forward_length": 8192,
            "phi3.rope.dimension_count": 96, "phi3.context_length": 4096, "phi3.vocab_size": 200064}  # fmt: skip
    cfg = ModelConfig.from_gguf(meta, {"output.weight"})
    assert (cfg.head_dim, cfg.rotary_dim, cfg.n_kv_heads) == (128, 96, 8)
    from longkv.errors import LongKVError

    with pytest.raises(LongKVError, match="short factors"):
        ModelConfig.from_gguf(meta, {"output.weight", "rope_factors_long.weight"})


def test_phi3_gguf_longrope_metadata() -> None:
    """A Phi-3.5 GGUF as llama.cpp writes it: the factors as rope_factors_long/short tensors, the original context
    and the attention factor as metadata; they give the same RopeScaling and q.k scale as the HF config."""
    import numpy as np

    from longkv.config import ModelConfig

    long_f, short_f = np.linspace(1.0, 30.0, 48, dtype=np.float32), np.linspace(1.0, 1.2, 48, dtype=np.float32)
    meta = {"general.architecture": "phi3", "phi3.embedding_length": 3072, "phi3.attention.head_count": 24,
            "phi3.attention.head_count_kv": 8, "phi3.block_count": 32, "phi3.feed_forward_length": 8192,
            "phi3.rope.dimension_count": 96, "phi3.context_length": 131072, "phi3.vocab_size": 200064,
            "phi3.rope.scaling.original_context_length": 4096, "phi3.rope.scaling.attn_factor": 1.1902380714238083}  # fmt: skip
    cfg = ModelConfig.from_gguf(meta, {"output.weight": None, "rope_factors_long.weight": long_f, "rope_factors_short.weight": short_f})
    s = cfg.rope_scaling
    assert s is not None and s.kind == "longrope" and s.original_max_position == 4096 and s.factor == 32.0
    assert s.long_factor == tuple(float(x) for x in long_f) and s.short_factor == tuple(float(x) for x in short_f)
    hf = ModelConfig.from_hf_config({
        "model_type": "phi3", "num_attention_heads": 24, "num_key_value_heads": 8, "hidden_size": 3072, "num_hidden_layers": 32,
        "vocab_size": 200064, "intermediate_size": 8192, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75, "rope_scaling": {"type": "longrope", "long_factor": long_f.tolist(), "short_factor": short_f.tolist()},
    })  # fmt: skip
    assert hf.rope_scaling == s and s.attention_factor == pytest.approx(1.1902380714238083)  # sqrt(1 + ln 32 / ln 4096)
