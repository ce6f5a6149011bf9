"""Models with sliding-window layers beside global ones: the ring of a window, and policies on global layers only.

A tiny random llama-shaped model whose layers 0 and 2 slide over 24 tokens and
layers 1 and 3 attend globally (the mix Gemma 3 has), float32, pages of 8 tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_llama_weights

from longkv.config import AttnSpec, EngineConfig, ModelConfig
from longkv.engine.runner import Runner, Sequence
from longkv.kv.pool import KVPools
from longkv.models import build
from longkv.policies import make_policy

WINDOW = 24
CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=4, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=4096, eos_token_ids=(0,),
    layers=(AttnSpec(10000.0, None, WINDOW), AttnSpec(1e6), AttnSpec(10000.0, None, WINDOW), AttnSpec(1e6)),
)  # fmt: skip
ENGINE = EngineConfig(chunk_size=16, page_size=8, dtype="float32")
MODEL = build(CFG, random_llama_weights(CFG, 3, 0.3))
SLIDING, GLOBAL = (0, 2), (1, 3)


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(spec: str, prompt: list[int], steps: int, pools: KVPools | None = None) -> tuple[list[torch.Tensor], Sequence]:
    """Logits after the prompt and after each greedy token; the sequence."""
    runner = Runner(MODEL, make_policy(spec).resolve(CFG, ENGINE), ENGINE, pools)
    seq = runner.new_sequence()
    out = [runner.prefill(seq, prompt)]
    for _ in range(steps):
        out.append(runner.decode(seq, int(out[-1].argmax())))
    return out, seq


def _reference(prompt: list[int], steps: int) -> list[torch.Tensor]:
    """The same greedy run as one full forward per step over every token, nothing dropped (the window is a mask)."""
    runner = Runner(MODEL, make_policy("dense"), EngineConfig(chunk_size=100_000, page_size=8, dtype="float32"))
    ids, out = list(prompt), []
    for _ in range(steps + 1):
        logits = runner.logits_all(runner.new_sequence(), ids)[-1]
        out.append(logits)
        ids.append(int(logits.argmax()))
    return out


def test_rotary_tables_follow_each_layers_spec() -> None:
    assert [spec.sliding for spec in CFG.layers] == [True, False, True, False]
    assert MODEL.ropes[0] is MODEL.ropes[2] and MODEL.ropes[1] is MODEL.ropes[3] and MODEL.ropes[0] is not MODEL.ropes[1]
    assert torch.allclose(MODEL.ropes[1].inv_freq[1], torch.tensor(1e6 ** (-2 / 8), dtype=torch.float64))


def test_sliding_layers_keep_a_ring_of_their_window_and_stay_exact() -> None:
    """150 prompt tokens in chunks of 16, then 20 decode steps: sliding layers hold at most window + a page + a
    chunk, global layers everything, and every logit equals the full forward that keeps every token."""
    prompt = _ids(150)
    pools = KVPools(ENGINE.page_size)
    got, seq = _run("dense", prompt, 20, pools)
    want = _reference(prompt, 20)
    assert max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) < 1e-4
    for i in SLIDING:
        lkv = seq.cache[i]
        assert WINDOW <= lkv.n < WINDOW + ENGINE.page_size
        assert lkv.positions().tolist() == list(range(170 - lkv.n, 170))  # the newest tokens, in order
        assert lkv.bytes() <= 2 * -(-(WINDOW + ENGINE.page_size) // 8) * lkv.pool.page_bytes()
    for i in GLOBAL:
        assert seq.cache[i].n == 170
    del seq, lkv
    assert pools.used_pages() == 0  # every page back, ring pages included


@pytest.mark.parametrize("spec", ["snapkv:budget=40", "streaming:budget=40,sinks=4", "kvzip:budget=40", "adakv:budget=40",
                                  "dense:kv_quant=int8"])
def test_policies_shape_global_layers_only(spec: str) -> None:
    """A user's policy (eviction, per-head, KV codec) applies to the global layers; sliding layers keep their
    plain ring whatever it is."""
    _, seq = _run(spec, _ids(150, 1), 10)
    for i in SLIDING:
        lkv = seq.cache[i]
        assert type(lkv).__name__ == "LayerKV" and lkv.codec == "none"
        assert lkv.positions().tolist() == list(range(160 - lkv.n, 160)) and lkv.n >= WINDOW
    for i in GLOBAL:
        lkv = seq.cache[i]
        if spec.startswith("dense"):
            assert lkv.n == 160 and lkv.codec == "int8"
        elif spec.startswith("adakv"):
            assert type(lkv).__name__ == "HeadwiseLayerKV"
        else:
            assert lkv.n < 160


@pytest.mark.parametrize("spec", ["snapkv:budget=400", "h2o:budget=400", "streaming:budget=400,sinks=4", "kvzip:budget=400"])
def test_a_budget_above_the_input_equals_dense_exactly(spec: str) -> None:
    prompt = _ids(120, 2)
    dense, _ = _run("dense", prompt, 8)
    got, _ = _run(spec, prompt, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, dense, strict=True))


def test_block_topk_selects_from_global_layers_and_matches_dense_when_reading_densely() -> None:
    """block_topk scores pages in the global layers only (sliding ones read their window), and where it reads the
    whole prompt (dense_below above it) its logits are the dense ones."""
    prompt = _ids(300, 3)
    dense, _ = _run("dense", prompt, 4)
    got, _ = _run("block_topk:dense_below=1000", prompt, 4)
    assert max((g - d).abs().max().item() for g, d in zip(got, dense, strict=True)) < 1e-4
    sparse, seq = _run("block_topk:sinks=8,window=32,query_tokens=8,topk=2,dense_below=0", prompt, 4)
    state = seq.selection
    assert state is not None and state.z is not None and state.z.shape[0] == len(GLOBAL)  # one row per global layer
    assert all(torch.isfinite(x).all() for x in sparse)


def test_gemma3_prompts_start_with_bos_and_keep_their_sliding_layers_in_a_ring(gemma3_path, smollm2_f32) -> None:  # type: ignore[no-untyped-def]
    """The real Gemma 3 270M: its tokenizer puts <bos> before every text, so a prompt gets it (without it the model
    loses the thread); SmolLM2's adds nothing and its prompts are unchanged. Asked about a text, it answers after
    '### Answer' and stops at the next section. Over 1300
    tokens its 15 sliding layers keep about their 512-token window while the 3 global layers keep every token."""
    from longkv import LLM

    llm = LLM(gemma3_path, dtype="float32", policy="dense")
    assert llm.bos_id == 2 and llm.prompt_ids("The capital of Spain is")[0] == 2
    prompt = "The capital of France is the city of"
    assert llm.generate(prompt, max_new_tokens=4).text.startswith(" Paris")
    assert "Paris" not in llm.generate(llm.encode(prompt), max_new_tokens=4).text  # no <bos>: " France is the city"
    assert smollm2_f32.bos_id is None and smollm2_f32.prompt_ids("Hello there") == smollm2_f32.encode("Hello there")
    # a base model (no chat template): ask frames the question as a completion after '### Answer' and stops
    # where the model opens the next section
    text = "It was a quiet harbour town. " * 20 + "The lighthouse keeper's cat was named Pemberton. " + "Boats came and went. " * 20
    out = llm.ask(text, "What was the name of the lighthouse keeper's cat?", max_new_tokens=24)
    assert llm.ask_stop == ("\n### ", "\n\n") and "Pemberton" in out.text and "###" not in out.text and out.finish_reason == "stop"
    runner = Runner(llm.model, make_policy("dense"), llm.engine_config)
    seq = runner.new_sequence()
    runner.prefill(seq, llm.prompt_ids("word " * 1300))
    windows = [spec.window for spec in llm.config.layers]
    assert windows.count(None) == 3 and set(windows) == {None, 512}
    for i, w in enumerate(windows):
        n = seq.cache[i].n
        assert n == len(seq.tokens) if w is None else 512 <= n < 512 + llm.engine_config.page_size
