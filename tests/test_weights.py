"""Decode weight formats: int4 codes round-trip, the int4/int8 kernels against dequantize-then-matmul, bad formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longkv import kernels
from longkv.models.layers import Linear, dequantize_int4, int4_group, quantize_int4


def _w(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int4_codes_round_trip_within_half_a_step() -> None:
    w = _w(96, 192)
    codes, step, lo = quantize_int4(w, 64)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    back = dequantize_int4(codes, step, lo, 64)
    err = (back - w).abs().reshape(96, 3, 64)
    assert bool((err <= step[..., None] / 2 + 1e-7).all())
    again = dequantize_int4(*quantize_int4(back, 64), 64)  # coded values code to themselves
    assert float((again - back).abs().max()) < 1e-6


@pytest.fixture(params=["kernels", "torch"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both layouts of the coded copy: longkv.kernels blocks (where a C compiler is), PyTorch's own kernels."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("no C compiler: longkv's CPU kernels are off")
    if request.param == "torch":
        monkeypatch.setenv("LONGKV_KERNELS", "0")
    return str(request.param)


@pytest.mark.parametrize("k", [576, 96])
def test_int4_linear_equals_dequantized_matmul(k: int, layout: str) -> None:
    w = _w(160, k, 1).to(torch.bfloat16)
    b = torch.randn(160).to(torch.bfloat16)
    lin = Linear(w, b, "int4")
    g = int4_group(k)
    assert lin.group == g and lin.bits == (4 if layout == "kernels" else 0)
    assert lin.decode_bytes() == (160 * k // 32 * 20 if layout == "kernels" else 160 * k // 2 + 160 * k // g * 2 * 2)
    ref_w = dequantize_int4(*quantize_int4(w, g), g)
    for rows in (1, 3, 4, 8, Linear.decode_max_rows):  # a batched decode step of up to 32 sequences
        x = torch.randn(rows, k).to(torch.bfloat16)
        want = x.float() @ ref_w.T + b.float()
        got = lin(x).float()
        assert got.shape == (rows, 160)
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    x = torch.randn(Linear.decode_max_rows + 1, k).to(torch.bfloat16)  # more rows (a prefill chunk): the exact weights
    exact = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16) if lin.upcast else F.linear(x, w, b)
    assert torch.equal(lin(x), exact)


def test_bf16_products_run_in_float32_where_bf16_is_slow() -> None:
    """On a CPU without native bfloat16 products a prefill chunk's product is the float32 product of the same
    bfloat16 weights (W stays bfloat16), and a decode step's attention equals the float32 attention."""
    from longkv.attention.dense import attend
    from longkv.config import fast_bf16_matmul

    w = _w(96, 64, 2).to(torch.bfloat16)
    lin = Linear(w)
    assert lin.upcast == (not fast_bf16_matmul("cpu")) and lin.w.dtype == torch.bfloat16
    x = torch.randn(Linear.upcast_min_rows, 64).to(torch.bfloat16)
    if lin.upcast:
        assert torch.equal(lin(x), F.linear(x.float(), w.float()).to(torch.bfloat16))
    assert not Linear(w.float()).upcast  # float32 weights multiply as they are
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(h, n, 16, generator=g).to(torch.bfloat16) for h, n in ((6, 1), (2, 50), (2, 50)))
    pos = torch.arange(50)
    got = attend(q, k, v, pos[-1:], pos).float()
    want = attend(q.float(), k.float(), v.float(), pos[-1:], pos)
    torch.testing.assert_close(got, want, rtol=0.01, atol=0.01)


def test_int8_linear_and_bad_formats(layout: str) -> None:
    w = _w(64, 128, 2).to(torch.bfloat16)
    lin = Linear(w, None, "int8")
    x = torch.randn(2, 128).to(torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), x.float() @ w.float().T, rtol=0.03, atol=0.03)
    # kernels: a float16 scale per block of 32 (Q8_0); PyTorch's kernel: one bfloat16 scale per output channel
    assert lin.decode_bytes() == (64 * 128 // 32 * 34 if layout == "kernels" else 64 * 128 + 64 * 2)
    with pytest.raises(ValueError, match="unknown decode weight format"):
        Linear(w, None, "int2")
    with pytest.raises(ValueError, match="multiples of 32"):
        Linear(_w(8, 40), None, "int4")


def test_bits_per_weight_of_ggml_types_and_the_auto_choice() -> None:
    from longkv.engine.llm import auto_weights
    from longkv.loading import _ggml_bits

    assert [_ggml_bits(t) for t in ("Q4_1", "Q4_K", "IQ3_S", "Q5_0", "Q6_K", "Q8_0", "F16", "BF16", "F32")] == [4, 4, 3, 5, 6, 8, 16, 16, 32]
    four = {"model.layers.0.mlp.down_proj.weight": 4, "model.layers.0.self_attn.q_proj.weight": 4, "model.embed_tokens.weight": 8}
    assert auto_weights("bfloat16", four) == "int4"  # the 8-bit embedding is the LM head, which stays int8
    # a Q4_K_M-like file (some matrices at 6 bits): int4 for the 4-bit ones, int8 for the rest
    assert auto_weights("bfloat16", {**four, "model.layers.0.self_attn.v_proj.weight": 6}) == "mixed"
    assert auto_weights("bfloat16", {k: 5 for k in four}) == "int8"  # all Q5_0: no matrix to keep at 4 bits
    assert auto_weights("bfloat16", {}) == "int8"  # an HF folder (bf16/f32 weights)
    assert auto_weights("float32", four) == "none"


def test_real_smollm2_decodes_int4_by_default_at_the_bf16_perplexity(smollm2_bf16, smollm2_path, book_text: str) -> None:  # type: ignore[no-untyped-def]
    from longkv import LLM
    from longkv.bench.ppl import streaming_nll

    assert smollm2_bf16.decode_weights == "int4"
    stats = smollm2_bf16.generate("Hello", max_new_tokens=2).stats  # a user sees which weights ran
    assert "| weights int4 | policy " in stats.line() and stats.as_dict()["weights"] == "int4"
    assert smollm2_bf16.model.lm_head.decode == "int8" and smollm2_bf16.model.layers[0].qkv.decode == "int4"
    plain = LLM(model=smollm2_path, dtype="bfloat16", weights="none", threads=2)
    ids = smollm2_bf16.encode(book_text[20_000:])[:352]
    ratio = streaming_nll(smollm2_bf16, ids, 256, "dense").ppl / streaming_nll(plain, ids, 256, "dense").ppl
    assert abs(ratio - 1) < 0.03, ratio  # decode perplexity of 96 book tokens within 3 % of the bf16 weights


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mixed_weights_code_each_matrix_by_the_bits_the_file_gave_it(arch: str, layout: str) -> None:
    """``mixed``: a matrix is int4 when every tensor in it was stored in 4 bits or fewer, else int8 (a Q4_K_M
    file's Q6_K ones); a fused matrix (q/k/v, gate/up) follows its widest part; Phi-3's fused tensors give their
    bits to the parts. The LM head stays int8, and the coded copies are those of the uniform formats."""
    from longkv.config import ModelConfig
    from longkv.models import build
    from longkv.models.layers import matrix_decode
    from tests.conftest import random_llama_weights

    cfg = ModelConfig(
        arch=arch, vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        max_position=2048, eos_token_ids=(0,),
    )  # fmt: skip
    w = {k: v.to(torch.bfloat16) for k, v in random_llama_weights(cfg, 7, 0.3).items()}
    proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    bits = {f"model.layers.{i}.{p}.weight": 4 for i in range(2) for p in proj} | {"model.embed_tokens.weight": 6}
    bits["model.layers.0.self_attn.v_proj.weight"] = bits["model.layers.0.mlp.down_proj.weight"] = 6
    if arch == "phi3":  # the file stores q/k/v and gate/up fused; their bits come under the fused names
        for i in range(2):
            p = f"model.layers.{i}."
            w[p + "self_attn.qkv_proj.weight"] = torch.cat([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            w[p + "mlp.gate_up_proj.weight"] = torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
            qkv = [bits.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            gate_up = [bits.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            bits[p + "self_attn.qkv_proj.weight"], bits[p + "mlp.gate_up_proj.weight"] = max(qkv), max(gate_up)
    model = build(cfg, w, "mixed", weight_bits=bits)
    got = [[L.qkv.decode, L.o.decode, L.gate_up.decode, L.down.decode] for L in model.layers]
    assert got == [["int8", "int4", "int4", "int8"], ["int4", "int4", "int4", "int4"]]
    assert model.lm_head.decode == "int8" and model.decode_weights == "mixed"
    int4 = build(cfg, w, "int4")
    assert torch.equal(model.layers[1].qkv.q, int4.layers[1].qkv.q) and torch.equal(model.layers[0].o.q, int4.layers[0].o.q)
    assert torch.equal(model.layers[0].qkv.q, build(cfg, w, "int8").layers[0].qkv.q)
    assert matrix_decode("mixed", {}, ["model.layers.0.mlp.down_proj.weight"]) == "int8"  # no bits known: 16
    assert matrix_decode("int4", {"x": 8}, ["x"]) == "int4"  # the uniform formats ignore the file's bits
