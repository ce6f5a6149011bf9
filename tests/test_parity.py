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


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_tiny_random_models_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    llm = LLM(model=folder, dtype="float32")
    assert llm.config.attention_bias == (fixture == "tiny_qwen2")
    ids = torch.randint(0, 300, (260,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = _ours_all(llm, ids)
    ref = _hf_logits(folder, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


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
