"""int8 / int4 KV codecs: error bounds, exact bytes, composition with eviction."""

from __future__ import annotations

import pytest
import torch

from longkv.config import EngineConfig
from longkv.engine.runner import Runner
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.kv.headwise import HeadwiseLayerKV
from longkv.kv.quant import dequantize, quantize
from longkv.policies import make_policy
from tests.test_policies import ids, run, tiny_model


@pytest.mark.parametrize("bits", [8, 4])
def test_roundtrip_error_is_half_a_step(bits: int) -> None:
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0)) * 3
    codes, step, lo = quantize(x, bits, 32)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 10, 64 * bits // 8)
    assert step.shape == lo.shape == (2, 10, 2) and step.dtype == torch.float16
    y = dequantize(codes, step, lo, bits, 32, torch.float32)
    err = (x - y).abs().reshape(2, 10, 2, 32)
    bound = step.float()[..., None] / 2 + 1e-3 * x.abs().max()  # half a step + float16 rounding of the minimum
    assert (err <= bound).all()
    assert float(err.max()) > 0  # really lossy: the bound is the thing tested


def test_constant_group_decodes_exactly() -> None:
    x = torch.full((1, 3, 32), 0.75)
    assert torch.equal(dequantize(*quantize(x, 4, 32), 4, 32, torch.float32), x)


@pytest.mark.parametrize(("bits", "per_token"), [(8, 2 * 2 * (64 + 4 * 2) + 8), (4, 2 * 2 * (32 + 4 * 2) + 8)])
def test_bytes_are_exact(bits: int, per_token: int) -> None:
    # 2 KV heads, head_dim 64, groups of 32: codes D*bits/8 + step and minimum (2 x float16) per group, K and V; position int64
    store = LayerKV(2, 64, page_size=64, dtype=torch.bfloat16, codec=f"int{bits}")
    store.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64), torch.arange(200))
    assert store.capacity == 256 and store.bytes() == 256 * per_token
    store.keep(torch.arange(0, 200, 8))  # 25 left: the buffers shrink to one 64-slot page
    assert store.n == 25 and store.bytes() == 64 * per_token
    k, _, pos = store.view()
    assert k.dtype == torch.bfloat16 and k.shape == (2, 25, 64) and pos.tolist() == list(range(0, 200, 8))
    plain = LayerKV(2, 64, 64, torch.bfloat16)
    plain.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64), torch.arange(200))
    assert plain.bytes() == 256 * (2 * 2 * 64 * 2 + 8)  # bfloat16: 520 bytes a token against 296 (int8) / 168 (int4)


def test_keep_moves_codes_with_their_scales() -> None:
    x = torch.randn(1, 8, 32) * torch.arange(1, 9)[None, :, None]  # every token its own scale
    store = LayerKV(1, 32, page_size=4, codec="int8")
    store.append(x, -x, torch.arange(8))
    full_k, full_v, _ = store.view()
    store.keep(torch.tensor([1, 5, 6]))
    k, v, _ = store.view()
    assert torch.equal(k, full_k[:, [1, 5, 6]]) and torch.equal(v, full_v[:, [1, 5, 6]])
    k2, _, pos = store.gather_pages(torch.tensor([0]))
    assert torch.equal(k2, k) and pos.tolist() == [1, 5, 6]


@pytest.mark.parametrize("spec", ["snapkv", "adakv", "knorm"])
def test_quantized_store_composes_with_eviction(spec: str) -> None:
    model = tiny_model("llama", seed=9)
    prompt = ids(200, seed=10)
    errs = {}
    for quant in ("none", "int8", "int4"):
        pol = make_policy(f"{spec}:kv_quant={quant}", budget=48)
        seq, _ = run(model, pol, prompt, steps=2)
        layer = seq.cache[0]
        heads = layer.heads if isinstance(layer, HeadwiseLayerKV) else [layer]
        assert all(h.codec == quant for h in heads)
        assert [lk.n for lk in seq.cache.layers] == [50, 50]  # budget + 2 decoded tokens
        _, full = run(model, make_policy(f"{spec}:kv_quant={quant}", budget=400), prompt, steps=0)  # nothing evicted
        if quant == "none":
            ref = full
        errs[quant] = float((full - ref).abs().max() / ref.abs().max())
    assert 0 < errs["int8"] < 0.02 and errs["int8"] < errs["int4"] < 0.4, errs  # relative, peaked random model


def test_bad_codec_raises() -> None:
    with pytest.raises(LongKVError, match="cannot store head_dim 48 as int4"):
        LayerKV(1, 48, codec="int4")
    with pytest.raises(LongKVError, match="unknown kv_quant"):
        make_policy("snapkv:kv_quant=fp8").new_layer_kv(1, 64, 64, torch.float32)
    model = tiny_model()
    with pytest.raises(LongKVError, match="unknown kv_quant"):
        Runner(model, make_policy("knorm:kv_quant=int2"), EngineConfig()).new_sequence()
