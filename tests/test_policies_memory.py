"""Bounded memory: compressing after every prefill chunk caps resident KV at budget + chunk tokens.

Exact byte accounting on a 32 K-token input with a tiny model: the peak is
exactly the bytes of ``round_up(budget + chunk, page)`` slots per layer, which
does not depend on the input length, and the cache ends at ``budget`` tokens.
"""

from __future__ import annotations

import pytest
import torch

from longkv.config import EngineConfig
from longkv.engine.runner import Runner
from longkv.kv.headwise import HeadwiseLayerKV
from longkv.policies import make_policy
from tests.test_policies import tiny_model

N_TOKENS = 32 * 1024
CHUNK, BUDGET, PAGE = 512, 256, 64
SLOTS = 768  # round_up(BUDGET + CHUNK, PAGE)


def per_slot_bytes(quant: str, hkv: int = 2, d: int = 16) -> int:
    kv = {"none": 2 * hkv * d * 4, "int8": 2 * hkv * (d + 4), "int4": 2 * hkv * (d // 2 + 4)}[quant]  # float32 / codes + scales
    return kv + 8  # + int64 position


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("spec", "quant"),
    [
        ("snapkv", "none"),
        pytest.param("h2o", "none", marks=SLOW),
        pytest.param("snapkv", "int4", marks=SLOW),
        pytest.param("pyramid", "none", marks=SLOW),
        pytest.param("adakv", "int8", marks=SLOW),
    ],
)
def test_32k_input_peak_kv_is_budget_plus_chunk(spec: str, quant: str) -> None:
    model = tiny_model("llama", seed=11)
    engine = EngineConfig(chunk_size=CHUNK, page_size=PAGE)
    policy = make_policy(f"{spec}:kv_quant={quant}", budget=BUDGET)
    policy = policy.resolve(model.config, engine)
    runner = Runner(model, policy, engine)
    seq = runner.new_sequence(N_TOKENS)
    ids = torch.randint(0, 64, (N_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    resident: list[int] = []
    runner.prefill(seq, ids, progress=lambda done, total: resident.append(seq.cache.bytes()))
    assert len(resident) == N_TOKENS // CHUNK
    L = model.config.n_layers
    if spec == "pyramid":  # per-layer budgets 476 / 36 (mean 256), each layer reserves its own budget + a chunk
        assert [policy.layer_budget(i) for i in range(L)] == [476, 36]
        assert seq.peak_kv_bytes == (1024 + 576) * per_slot_bytes(quant)
        # after a chunk and its compression: layer 0 holds 476 tokens in 1024 slots, layer 1 36 tokens in one page
        assert resident[-1] == (1024 + 64) * per_slot_bytes(quant)
        assert seq.cache.tokens() == [476, 36]
        return
    if spec == "adakv":  # per-head stores: the layer holds budget x heads (head, token) pairs
        for lkv in seq.cache.layers:
            assert isinstance(lkv, HeadwiseLayerKV) and sum(lkv.tokens_per_head()) == 2 * BUDGET
        # heads hold uneven counts; each single-head store (positions of its own) stays within
        # two pages of budget + chunk slots
        assert seq.peak_kv_bytes <= L * 2 * (SLOTS + 2 * PAGE) * per_slot_bytes(quant, hkv=1)
        return
    # H2O's accumulated scores, (Hkv, tokens) float32 per layer, cover the budget when the peak is taken
    # (after a chunk is appended); inside compress they briefly cover budget + chunk.
    acc = L * 2 * BUDGET * 4 if spec == "h2o" else 0
    assert seq.peak_kv_bytes == L * SLOTS * per_slot_bytes(quant) + acc
    assert seq.cache.tokens() == [BUDGET] * L
    assert max(resident) <= seq.peak_kv_bytes
