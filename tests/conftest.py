"""Shared fixtures: real models from ../shared (skipped when absent) and tiny random models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOOKS = SHARED / "data" / "books"


THREADS = torch.get_num_threads()  # the session's count, before any LLM(threads=...) sets it


@pytest.fixture(autouse=True)
def _torch_threads():  # type: ignore[no-untyped-def]
    """Hand every test after this one the thread count the session started with: ``LLM(threads=1)``
    sets torch's process-wide count, and bfloat16 sums split over another count of threads round
    differently (a greedy answer on the edge can flip), so one module's setting must not reach the next."""
    yield
    torch.set_num_threads(THREADS)


def _get_model(name: str) -> Path:
    script = SHARED / "models" / "get-model"
    if not script.exists():
        pytest.skip(f"../shared is absent: no real model {name} to test with")
    proc = subprocess.run([str(script), name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"get-model {name} failed: {proc.stderr.strip()[-200:]}")
    return Path(proc.stdout.strip())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the real SmolLM2-135M-Instruct GGUF (Q4_1)."""
    return _get_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Path of the real Gemma 3 270M base model GGUF (gemma3: 18 layers, sliding window 512, every 6th global)."""
    return _get_model("gemma3-270m")


@pytest.fixture(scope="session")
def book_text() -> str:
    """Real long text (Alice in Wonderland)."""
    path = BOOKS / "alice-in-wonderland.txt"
    if not path.exists():
        pytest.skip("../shared/data/books is absent: no real text to test with")
    return path.read_text()


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_path: Path):
    """The real SmolLM2 loaded once in float32 (exact path)."""
    from longkv import LLM

    return LLM(model=smollm2_path, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_path: Path):
    """The real SmolLM2 loaded once on the fast path (bfloat16; decode reads int4 copies of its Q4_1 matrices)."""
    from longkv import LLM

    return LLM(model=smollm2_path, dtype="bfloat16")


def _tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with a chat template, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "Alice was beginning to get very tired.", "def main(): pass"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(folder))


def make_tiny_hf_model(folder: Path, model_type: str, seed: int = 0, max_position: int = 512, **extra: object) -> Path:
    """Save a tiny random HF model (config.json + safetensors + tokenizer) of ``model_type`` (``extra``: config fields)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fields: dict[str, object] = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=None,
    )
    cfg = AutoConfig.for_model(model_type, **{**fields, **extra})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random biases too, so the q/k/v bias path is really exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif model_type.startswith("gemma") and name.endswith("norm.weight"):  # Gemma's (1 + w): offsets away from 0
                p.normal_(0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # QK-norm weights away from 1: really applied
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    _tiny_tokenizer(folder)
    cfg_dict = json.loads((folder / "config.json").read_text())
    assert cfg_dict["model_type"] == model_type
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (q/k/v biases, GQA 4/2) saved as an HF folder."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (QK-norm, GQA 4/2, head_dim 24 != hidden / heads) saved as an HF folder."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=2, head_dim=24)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mistral whose every layer attends over a sliding window of 24 tokens, as an HF folder."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=5, sliding_window=24)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 text model as an HF folder: 6 layers (5 sliding over 16 tokens, the 6th global),
    RoPE base 10 K on sliding layers and 100 K with linear scaling x4 on the global one, head_dim 16 with
    query_pre_attn_scalar 24 (an attention scale other than head_dim ** -0.5), random norm offsets."""
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
    }
    return make_tiny_hf_model(
        tmp_path_factory.mktemp("tiny-gemma3"), "gemma3_text", seed=8, num_hidden_layers=6, head_dim=16,
        sliding_window=16, query_pre_attn_scalar=24, rope_parameters=rope, pad_token_id=0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA 4/2) saved as an HF folder."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


def random_llama_weights(cfg, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """HF-named random weights (normal * ``scale``) for a llama-shaped ``ModelConfig``, unit norms."""
    g = torch.Generator().manual_seed(seed)
    c = cfg

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": r(c.vocab_size, c.hidden_size), "model.norm.weight": torch.ones(c.hidden_size)}
    w["lm_head.weight"] = r(c.vocab_size, c.hidden_size)
    kv = c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "post_attention_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "self_attn.q_proj.weight"] = r(c.n_heads * c.head_dim, c.hidden_size)
        w[p + "self_attn.k_proj.weight"] = r(kv, c.hidden_size)
        w[p + "self_attn.v_proj.weight"] = r(kv, c.hidden_size)
        w[p + "self_attn.o_proj.weight"] = r(c.hidden_size, c.n_heads * c.head_dim)
        w[p + "mlp.gate_proj.weight"] = r(c.intermediate_size, c.hidden_size)
        w[p + "mlp.up_proj.weight"] = r(c.intermediate_size, c.hidden_size)
        w[p + "mlp.down_proj.weight"] = r(c.hidden_size, c.intermediate_size)
    return w


def staggered_batches(model, runners: list, prompts: list[list[int]], steps: int):  # type: ignore[no-untyped-def]
    """Run sequence i (its own runner) from step 2 i on, each step one ``run_batch`` of every live sequence's
    next works (prompt chunks, then greedy decode tokens), until each has its logits after the prompt and
    after ``steps`` tokens. Returns (logits per sequence, the works of every step)."""
    from longkv.engine.step import Work, run_batch

    seqs = [r.new_sequence() for r in runners]
    plans = [r.plan_prefill(s, p) for r, s, p in zip(runners, seqs, prompts, strict=True)]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    batches: list[list[Work]] = []
    step = 0
    while any(len(g) < steps + 1 for g in got):
        works, owners = [], []
        for i in range(len(prompts)):
            if step < 2 * i or len(got[i]) == steps + 1:
                continue  # not arrived yet, or gone
            mine = plans[i].next_works() if not plans[i].done else [Work(runners[i], seqs[i], [int(got[i][-1].argmax())], decode=True)]
            works.extend(mine)
            owners.extend([i] * len(mine))
        batches.append(works)
        for i, lg in zip(owners, run_batch(model, works), strict=True):
            if lg is not None:
                got[i].append(lg)
        step += 1
    return got, batches
