"""Eviction policies: the method x budget matrix on tiny random models, exact kept sets, errors.

Every method: budget >= input gives the dense logits exactly; a small budget
keeps exactly ``budget`` tokens per layer (per-layer budgets for PyramidKV,
per-head sets summing to the layer budget for AdaKV) with the sinks and local
window each method promises; the same input keeps the same tokens; a batch of
two prompts of different lengths ends as each prompt does alone.
"""

from __future__ import annotations

import pytest
import torch

from longkv.config import EngineConfig, ModelConfig
from longkv.engine.runner import Runner
from longkv.engine.step import Work, run_batch
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.kv.headwise import HeadwiseLayerKV
from longkv.models import build
from longkv.policies import (
    AdaKVPolicy,
    DensePolicy,
    EvictionPolicy,
    H2OPolicy,
    KNormPolicy,
    PyramidPolicy,
    SnapKVPolicy,
    TOVAPolicy,
    make_policy,
)
from longkv.policies.base import Observation, window_attention
from longkv.policies.modes import fork, prefill_with_question

METHODS = [
    "streaming",
    "h2o",
    "tova",
    "snapkv",
    "pyramid:scorer=snapkv",
    "pyramid:scorer=h2o",
    "adakv:scorer=snapkv",
    "adakv:scorer=expected_attention",
    "knorm",
    "expected_attention",
    "kvzip",
    "kvzip:scope=layer,kernel=5",
    "adakv:scorer=kvzip",
    "random",
]


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 2, max_position: int = 1 << 20, dtype: torch.dtype = torch.float32):
    """A random llama/qwen2 model: hidden 64, 4 heads / 2 KV heads (GQA), head_dim 16, vocab 64."""
    cfg = ModelConfig(
        arch=arch, vocab_size=64, hidden_size=64, intermediate_size=128, n_layers=n_layers, n_heads=4,
        n_kv_heads=2, head_dim=16, max_position=max_position, attention_bias=arch == "qwen2",
    )
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    w = {"model.embed_tokens.weight": rnd(64, 64, std=1.0), "model.norm.weight": torch.ones(64, dtype=dtype), "lm_head.weight": rnd(64, 64)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(64, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(64, dtype=dtype)
        w[p + "self_attn.q_proj.weight"] = rnd(64, 64, std=0.4)  # peaked attention: scores differ
        w[p + "self_attn.k_proj.weight"] = rnd(32, 64, std=0.4)
        w[p + "self_attn.v_proj.weight"] = rnd(32, 64)
        w[p + "self_attn.o_proj.weight"] = rnd(64, 64)
        if arch == "qwen2":
            for n, d in (("q", 64), ("k", 32), ("v", 32)):
                w[p + f"self_attn.{n}_proj.bias"] = rnd(d, std=0.5)
        w[p + "mlp.gate_proj.weight"] = rnd(128, 64)
        w[p + "mlp.up_proj.weight"] = rnd(128, 64)
        w[p + "mlp.down_proj.weight"] = rnd(64, 128)
    return build(cfg, w)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest):
    return tiny_model(request.param)


ENGINE = EngineConfig(chunk_size=32)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, policy, prompt: list[int], steps: int = 4):
    """Prefill then greedy decode ``steps`` tokens; return (sequence, stacked logits (steps + 1, V))."""
    policy = policy.resolve(model.config, ENGINE)
    runner = Runner(model, policy, ENGINE)
    seq = runner.new_sequence(len(prompt) + steps)
    logits = [runner.prefill(seq, prompt)]
    for _ in range(steps):
        logits.append(runner.decode(seq, int(logits[-1].argmax())))
    return seq, torch.stack(logits)


def kept_positions(seq) -> list:
    out = []
    for lkv in seq.cache.layers:
        if isinstance(lkv, HeadwiseLayerKV):
            out.append([h.view()[2].tolist() for h in lkv.heads])
        else:
            out.append(lkv.view()[2].tolist())
    return out


_DENSE: dict[int, tuple[object, torch.Tensor]] = {}  # id(model) -> (model, dense logits): the model is kept so its id is not reused


@pytest.mark.parametrize("spec", METHODS)
def test_budget_above_input_equals_dense(model, spec: str) -> None:
    prompt = ids(100)
    if id(model) not in _DENSE or _DENSE[id(model)][0] is not model:
        _DENSE[id(model)] = (model, run(model, DensePolicy(), prompt)[1])
    dense = _DENSE[id(model)][1]
    seq, got = run(model, make_policy(spec, budget=4000), prompt)  # pyramid: last layer 4000 / 20
    if spec.startswith("adakv"):  # attention per KV group instead of one GQA call: same math, other summation order
        torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, dense)
    assert all(len(p) == 104 or p == [list(range(104))] * 2 for p in kept_positions(seq))


@pytest.mark.parametrize("spec", METHODS)
def test_small_budget_keeps_exact_counts_sinks_and_window(model, spec: str) -> None:
    budget = 48
    policy = make_policy(spec, budget=budget).resolve(model.config, ENGINE)  # PyramidKV: its depth fixed
    prompt = ids(200, seed=1)
    seq, logits = run(model, policy, prompt, steps=0)
    assert torch.isfinite(logits).all()
    n_layers, hkv = model.config.n_layers, model.config.n_kv_heads
    for layer, lkv in enumerate(seq.cache.layers):
        if isinstance(policy, AdaKVPolicy):
            assert isinstance(lkv, HeadwiseLayerKV)
            counts = lkv.tokens_per_head()
            assert sum(counts) == budget * hkv
            sinks, window = policy.protected(budget)
            assert min(counts) >= max(int(policy.floor * budget), sinks + window)
            for head in lkv.heads:
                pos = head.view()[2].tolist()
                assert pos[:sinks] == list(range(sinks)) and pos[len(pos) - window :] == list(range(200 - window, 200))
            continue
        expected = policy.layer_budget(layer)
        assert lkv.n == expected
        pos = lkv.view()[2].tolist()
        assert pos == sorted(set(pos))
        sinks, window = policy.protected(expected)
        if spec == "streaming":
            sinks, window = policy.sinks, policy.local_window
        assert pos[:sinks] == list(range(sinks))
        assert pos[len(pos) - window :] == list(range(200 - window, 200))
    if isinstance(policy, PyramidPolicy):
        budgets = [policy.layer_budget(i) for i in range(n_layers)]
        assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
        assert abs(sum(budgets) - budget * n_layers) <= n_layers // 2  # mean budget, to rounding


@pytest.mark.parametrize("spec", METHODS)
def test_same_input_same_kept_set(spec: str) -> None:
    model = tiny_model("llama", seed=3)
    prompt = ids(150, seed=2)
    a, la = run(model, make_policy(spec, budget=40), prompt, steps=33)  # one compression while decoding
    b, lb = run(model, make_policy(spec, budget=40), prompt, steps=33)
    assert kept_positions(a) == kept_positions(b)
    assert torch.equal(la, lb)


def test_methods_keep_different_tokens() -> None:
    # The scorers are not all the same function in disguise.
    model = tiny_model("llama", seed=4)
    prompt = ids(200, seed=5)
    kept = {s: kept_positions(run(model, make_policy(s, budget=48), prompt, steps=0)[0]) for s in ("h2o", "tova", "snapkv", "knorm", "expected_attention", "random")}
    assert len({str(v) for v in kept.values()}) == len(kept)


# ----------------------------------------------------------------------------- scorers on crafted tensors
def test_knorm_keeps_lowest_key_norms() -> None:
    keys = torch.ones(2, 6, 4) * torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])[None, :, None]
    score = KNormPolicy(budget=3).score(0, keys, keys, torch.arange(6), None)
    assert torch.topk(score.sum(0), 3).indices.sort().values.tolist() == [1, 3, 5]


def test_tova_scores_with_last_query_only() -> None:
    keys = torch.eye(4)[None] * 10  # (1, 4, 4): token i points along axis i
    q = torch.zeros(1, 3, 4)
    q[0, 0, 0] = q[0, 1, 1] = q[0, 2, 2] = 10.0  # only the last query points at token 2
    s = TOVAPolicy(budget=1).score(0, keys, keys, torch.arange(4), Observation.newest(q, 3))
    assert int(s.argmax()) == 2
    w = window_attention(keys, Observation.newest(q, 3), torch.arange(4))
    assert w.shape == (1, 3, 4) and torch.allclose(w.sum(-1), torch.ones(1, 3))
    assert float(w[0, 0, 2:].sum()) == 0.0  # causal: the first window query does not see the last two keys


def test_snapkv_pools_neighbours() -> None:
    keys = torch.zeros(1, 20, 4)
    keys[0, 10, 0] = 10.0
    q = torch.zeros(1, 2, 4)
    q[0, :, 0] = 10.0
    s = SnapKVPolicy(budget=4, kernel=3).score(0, keys, keys, torch.arange(20), Observation.newest(q, 19))[0]
    assert s[9] == s[10] == s[11] and s[10] > s[12]


def test_chunks_are_kept_whole_by_their_mean_score() -> None:
    # 12 tokens in runs of 4: run 0 has one spike (mean 2.5), run 1 is even (mean 3), run 2 is low (mean 1)
    scores = torch.tensor([10.0, 0, 0, 0, 3, 3.1, 3.2, 2.7, 1, 1, 1, 1])
    policy = SnapKVPolicy(budget=4, sinks=0, window=0, kernel=1, chunk=4)
    assert policy.top(scores, 4).tolist() == [4, 5, 6, 7]  # the even run, not the spike (token-wise top-4 takes 0, 4-6)
    assert policy.top(scores, 6).tolist() == [0, 1, 4, 5, 6, 7]  # then the spike's run, its best tokens first
    assert SnapKVPolicy(budget=4, sinks=0, window=0, kernel=1).top(scores, 4).tolist() == [0, 4, 5, 6]
    # sinks and the local window stay whatever their run's score; the rest of the budget goes to whole runs
    protected = SnapKVPolicy(budget=6, sinks=1, window=1, kernel=1, chunk=4).top(scores, 6)
    assert protected.tolist() == [0, 4, 5, 6, 7, 11]


def test_adakv_keeps_whole_runs_of_each_head() -> None:
    # two KV heads of 12 tokens, the score written in each key's first dimension; 8 (head, token) pairs kept
    scores = torch.tensor([[10.0, 0, 0, 0, 3, 3.1, 3.2, 2.7, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 2.8, 2.8, 2.8, 2.8]])
    cache = HeadwiseLayerKV(lambda: LayerKV(1, 4), 2)
    keys = torch.zeros(2, 12, 4)
    keys[..., 0] = scores
    cache.append(keys, keys, torch.arange(12))
    policy = AdaKVPolicy(budget=4, floor=0.0, scorer="snapkv:sinks=0,window=0,kernel=1,chunk=4")
    policy.inner.score = lambda layer, k, v, pos, q: k[:, :, 0]  # type: ignore[method-assign]
    policy.compress(0, cache)
    # runs by mean: head 0's 4-7 (3.0), head 1's 8-11 (2.8), head 0's 0-3 (2.5): the first two, whole
    assert [h.positions().tolist() for h in cache.heads] == [[4, 5, 6, 7], [8, 9, 10, 11]]
    policy.inner.chunk = 1  # token by token: the best 8 pairs take head 0's spike instead of its 2.7
    cache = HeadwiseLayerKV(lambda: LayerKV(1, 4), 2)
    cache.append(keys, keys, torch.arange(12))
    policy.compress(0, cache)
    assert [h.positions().tolist() for h in cache.heads] == [[0, 4, 5, 6], [8, 9, 10, 11]]


def test_h2o_accumulates_across_compressions() -> None:

    pol = H2OPolicy(budget=3, recent_ratio=0.0)
    cache = LayerKV(1, 4)
    keys = torch.zeros(1, 6, 4)
    keys[0, 1, 0] = keys[0, 4, 1] = 10.0
    cache.append(keys, keys, torch.arange(6))
    hit1 = torch.zeros(1, 1, 4)
    hit1[0, 0, 0] = 10.0  # an early query attends to token 1 only
    pol.compress(0, cache, Observation.newest(hit1, 5))  # nothing evicted yet (budget 3 < 6 evicts): accumulation then eviction
    assert 1 in cache.view()[2].tolist()
    assert cache.acc is not None and cache.acc.shape == (1, 3)


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("spec", ["snapkv", "knorm", "adakv"])
def test_modes_bound_and_reuse(spec: str) -> None:
    model = tiny_model("qwen2", seed=6)
    context, question = ids(300, seed=7), ids(10, seed=8)
    out = {}
    for mode in ("question-agnostic", "question-aware"):
        policy = make_policy(spec, budget=64)
        policy = policy.resolve(model.config, ENGINE)
        runner = Runner(model, policy, ENGINE)
        seq = runner.new_sequence()
        logits = prefill_with_question(runner, seq, context, question, mode)
        assert seq.cache[0].n == (64 + 10 if mode == "question-agnostic" else 64)
        assert seq.peak_kv_bytes <= seq.cache.bytes() * 2
        out[mode] = logits
    if spec == "knorm":  # query-free: both modes keep the same context tokens
        torch.testing.assert_close(out["question-agnostic"], out["question-aware"], rtol=0, atol=1e-5)
    # a compressed context asked twice from forks gives the same answer
    policy = make_policy("snapkv", budget=64)
    runner = Runner(model, policy, ENGINE)
    seq = runner.new_sequence()
    runner.prefill(seq, context)
    a, b = fork(seq), fork(seq)
    assert torch.equal(runner.prefill(a, question, compress=False), runner.prefill(b, question, compress=False))
    assert seq.cache[0].n == 64


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("snapkv:budget=20,window=32", "below the sinks 4 \\+ local window 32"),
        ("h2o:budget=0", "budget >= 1"),
        ("expected_attention:budget=10", "below the sinks"),
        ("pyramid:beta=0.5", "beta must be >= 1"),
        ("adakv:floor=1.5", "floor must be within"),
        ("knorm:kv_quant=int3", "unknown kv_quant"),
        ("tova:positions=shifted", "unknown positions"),
        ("streaming:budget=64,positions=foo", "unknown positions 'foo'"),
        ("h2o:recent_ratio=1.5", "h2o recent_ratio must be within \\[0, 1\\], got 1.5"),
        ("pyramid:scorer=nope", "pyramid scorer 'nope': unknown policy 'nope'"),
        ("snapkv:budget=10,budget=20", "policy snapkv knob 'budget' is given twice"),
        ("auto:budget=10", "the auto policy takes no knobs"),
        ("streaming:budget=64,kv_quant=int3", "unknown kv_quant"),
    ],
)
def test_bad_knobs_raise(spec: str, match: str) -> None:
    with pytest.raises(LongKVError, match=match):
        make_policy(spec).resolve(tiny_model().config, ENGINE)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("snapkv:kernel=0", "kernel must be an odd number of tokens >= 1 \\(got 0\\)"),
        ("kvzip:kernel=4", "kernel must be an odd number"),
        ("snapkv:chunk=0", "snapkv chunk must be a number of tokens >= 1 \\(got 0\\): e.g. chunk=8"),
        ("adakv:scorer=h2o:chunk=-1", "h2o chunk must be a number of tokens >= 1"),
        ("kvzip:heads=avg", "unknown kvzip heads 'avg': use sum or max"),
        ("kvzip:layers=mean", "unknown kvzip layers 'mean'"),
        ("kvzip:scope=bogus", "unknown kvzip scope 'bogus': use layer or shared"),
    ],
)
def test_bad_pooling_and_scope_knobs_fail_at_once(spec: str, match: str) -> None:
    with pytest.raises(LongKVError, match=match):
        make_policy(spec)


def test_bad_wrappers_and_modes_raise() -> None:
    with pytest.raises(LongKVError, match="not a token scorer"):
        make_policy("pyramid:scorer=dense")
    with pytest.raises(LongKVError, match="not a token scorer"):
        AdaKVPolicy(scorer="adakv")
    with pytest.raises(LongKVError, match="model depth"):
        PyramidPolicy(budget=10).layer_budget(0)
    model = tiny_model()
    runner = Runner(model, SnapKVPolicy(budget=64), ENGINE)
    with pytest.raises(LongKVError, match="unknown compression mode"):
        prefill_with_question(runner, runner.new_sequence(), ids(5), ids(5), "question-first")  # type: ignore[arg-type]
    with pytest.raises(LongKVError, match="non-empty"):
        prefill_with_question(runner, runner.new_sequence(), [], ids(5), "question-aware")


def test_registry_lists_every_method() -> None:
    from longkv.policies import POLICIES

    for name in ("h2o", "tova", "snapkv", "pyramid", "adakv", "knorm", "expected_attention", "random"):
        assert issubclass(POLICIES[name], EvictionPolicy)


@pytest.mark.parametrize("spec", ["h2o", "snapkv", "adakv", "pyramid"])
def test_two_sequences_of_different_lengths_interleaved(spec: str) -> None:
    # Policies hold no per-sequence state (H2O's scores live in each cache): two sequences of
    # different lengths fed chunk by chunk in turn through one runner end as each does alone.
    model = tiny_model("qwen2", seed=12)
    policy = make_policy(spec, budget=40)
    policy = policy.resolve(model.config, ENGINE)
    runner = Runner(model, policy, ENGINE)
    prompts = [ids(190, seed=13), ids(97, seed=14)]
    alone = []
    for p in prompts:
        seq = runner.new_sequence()
        alone.append((runner.prefill(seq, p), kept_positions(seq)))
    seqs = [runner.new_sequence(), runner.new_sequence()]
    last: list[torch.Tensor | None] = [None, None]
    for start in range(0, 190, ENGINE.chunk_size):
        for i, p in enumerate(prompts):
            if start < len(p):
                last[i] = runner.prefill(seqs[i], p[start : start + ENGINE.chunk_size])
    for i in range(2):
        assert torch.equal(last[i], alone[i][0])
        assert kept_positions(seqs[i]) == alone[i][1]


def test_original_positions_keep_keys_where_they_were() -> None:
    pos = torch.tensor([0, 1, 7, 9])
    assert SnapKVPolicy(budget=4).key_positions(pos).tolist() == [6, 7, 8, 9]  # contiguous, ending at the newest
    original = SnapKVPolicy(budget=4, positions="original")
    assert original.key_positions(pos) is None
    cfg = tiny_model().config
    assert SnapKVPolicy().max_context(cfg) is None and original.max_context(cfg) == cfg.max_position


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model64(request: pytest.FixtureRequest):
    return tiny_model(request.param, dtype=torch.float64)


@pytest.mark.parametrize("budget", [4000, 40])
@pytest.mark.parametrize("spec", ["dense", *METHODS])
def test_batch_of_two_lengths_equals_each_alone(model64, spec: str, budget: int) -> None:
    # One forward per chunk / decode step for both sequences (ragged batch): same logits and
    # the same kept tokens, through prefill compressions and one compression while decoding
    # (34 steps). In float64, so the batch's other GEMM row count (rounding in the last bits)
    # cannot flip a near-tie between two tokens' scores.
    model = model64
    prompts = [ids(190, seed=13), ids(97, seed=14)]
    make = (lambda: DensePolicy()) if spec == "dense" else (lambda: make_policy(spec, budget=budget))
    alone = [run(model, make(), p, steps=34) for p in prompts]
    policy = make()
    policy = policy.resolve(model.config, ENGINE)
    runner = Runner(model, policy, ENGINE)
    seqs = [runner.new_sequence(), runner.new_sequence()]
    plans = [runner.plan_prefill(s, p) for s, p in zip(seqs, prompts, strict=True)]
    first: list[torch.Tensor | None] = [None, None]
    while not all(p.done for p in plans):  # each step: the next chunk of every unfinished prompt, one forward
        live = [i for i, p in enumerate(plans) if not p.done]
        works = [(i, w) for i in live for w in plans[i].next_works()]
        for (i, _), lg in zip(works, run_batch(model, [w for _, w in works]), strict=True):
            if lg is not None:
                first[i] = lg
    steps = [torch.stack(first)]  # type: ignore[arg-type]
    for t in range(34):  # feed each sequence the tokens it chose alone
        works = [Work(runner, seqs[i], [int(alone[i][1][t].argmax())], decode=True) for i in range(2)]
        steps.append(torch.stack(run_batch(model, works)))  # type: ignore[arg-type]
    got = torch.stack(steps, dim=1)  # (2, 35, V)
    for i in range(2):
        torch.testing.assert_close(got[i], alone[i][1], rtol=0, atol=1e-9)
        assert kept_positions(seqs[i]) == kept_positions(alone[i][0])
        assert seqs[i].tokens == alone[i][0].tokens


def test_empty_prefill_is_refused() -> None:
    runner = Runner(tiny_model(), DensePolicy(), ENGINE)
    with pytest.raises(ValueError, match="at least one token"):
        runner.plan_prefill(runner.new_sequence(), [])


def _probe(runner: Runner, seq, ids: list[int]) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    out: dict[int, torch.Tensor] = {}
    assert run_batch(runner.model, [runner.probe_work(seq, ids, out.update)]) == [None]
    return out


def test_probe_leaves_cache_and_gives_the_real_queries(model) -> None:
    # A probe's queries are those the same tokens get when prefilled for real; the cache is untouched.
    policy = make_policy("snapkv", budget=4000)
    runner = Runner(model, policy, ENGINE)
    seq = runner.new_sequence()
    runner.prefill(seq, ids(70, seed=20))
    before = kept_positions(seq), [lkv.view()[0].clone() for lkv in seq.cache.layers]
    question = ids(9, seed=21)
    probed = _probe(runner, seq, question)
    assert kept_positions(seq) == before[0] and len(seq.tokens) == 70
    assert all(torch.equal(lkv.view()[0], k) for lkv, k in zip(seq.cache.layers, before[1], strict=True))
    real = fork(seq)
    runner.prefill(real, question, compress=False)
    for layer in range(model.config.n_layers):
        assert probed[layer].shape == (model.config.n_heads, 9, model.config.head_dim)
        torch.testing.assert_close(probed[layer], real.queries[layer][:, -9:], rtol=0, atol=1e-5)


def test_a_probe_after_the_cache_sees_every_key() -> None:
    keys = torch.randn(2, 10, 16)
    queries = torch.randn(4, 3, 16)
    pos = torch.arange(10)
    causal = window_attention(keys, Observation.newest(queries, 9), pos)
    assert (causal[:, 0, 8:] == 0).all() and (causal[:, 1, 9:] == 0).all()  # query i sees up to 7 + i
    probe = window_attention(keys, Observation(queries, torch.arange(10, 13)), pos)
    assert (probe > 0).all()
    torch.testing.assert_close(probe[:, 2], causal[:, 2])  # the newest query sees everything either way
    torch.testing.assert_close(probe.sum(-1), torch.ones(2, 3))


def test_kvzip_scores_by_a_repeat_of_each_chunk() -> None:
    # After one 32-token chunk (nothing evicted) each token's score is the largest attention
    # any query of a second copy of the chunk, probed over the cache, gives it in its KV group.
    model = tiny_model("llama", seed=6)
    policy = make_policy("kvzip", budget=4000)
    runner = Runner(model, policy, ENGINE)
    seq = runner.new_sequence()
    chunk = ids(32, seed=22)
    runner.prefill(seq, chunk)
    probed = _probe(runner, seq, chunk)
    for layer, lkv in enumerate(seq.cache.layers):
        k, _, pos = lkv.view()
        expected = window_attention(k, Observation(probed[layer], torch.arange(32, 64)), pos, reduce="max").amax(1)
        torch.testing.assert_close(lkv.acc, expected)
    # the scores are a running maximum: a second chunk never lowers the first chunk's
    first = seq.cache[0].acc.clone()
    runner.prefill(seq, ids(32, seed=23))
    assert (seq.cache[0].acc[:, :32] >= first).all()


def test_question_aware_probes_the_question_after_every_chunk(monkeypatch) -> None:
    model = tiny_model("llama", seed=7)
    runner = Runner(model, make_policy("snapkv", budget=40), ENGINE)
    seen: list[tuple[int, list[int]]] = []
    real_probe = runner.probe_work

    def spy(seq, probe_ids, then):
        seen.append((len(seq.tokens), list(probe_ids)))
        return real_probe(seq, probe_ids, then)

    monkeypatch.setattr(runner, "probe_work", spy)
    question = ids(6, seed=24)
    prefill_with_question(runner, runner.new_sequence(), ids(100, seed=25), question, "question-aware")
    assert seen == [(32, question), (64, question), (96, question), (100, question)]


def test_shared_scope_keeps_one_set_for_every_layer() -> None:
    # scope=shared: every layer keeps the same tokens, the best by the sum over layers of each
    # layer's score shares; scope=layer lets the layers differ.
    model = tiny_model("llama", seed=8, n_layers=3)
    prompt = ids(120, seed=26)
    shared = kept_positions(run(model, make_policy("kvzip", budget=40, scope="shared"), prompt, steps=0)[0])
    per_layer = kept_positions(run(model, make_policy("kvzip", budget=40, scope="layer"), prompt, steps=0)[0])
    assert shared[0] == shared[1] == shared[2] and len(shared[0]) == 40
    assert not per_layer[0] == per_layer[1] == per_layer[2]


def test_shared_scope_ranks_by_summed_layer_shares() -> None:

    policy = make_policy("kvzip", budget=3, scope="shared", sinks=0, window=0, layers="sum", kernel=1)
    caches = []
    for acc in ([[6.0, 0.0, 0.0, 0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 1.0, 2.0, 5.0]]):
        lkv = LayerKV(1, 4, 64, torch.float32)
        lkv.append(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.arange(6))
        lkv.acc = torch.tensor(acc)
        caches.append(lkv)
    policy.compress_layers(dict(enumerate(caches)), {})  # no queries: rank by the stored totals alone
    # shares: layer 0 -> .75 (token 0), .25 (4); layer 1 -> .125 (3), .25 (4), .625 (5)
    # totals: 0 -> .75, 5 -> .625, 4 -> .5, 3 -> .125: layer 1 alone would keep 3 over 0
    assert [lkv.view()[2].tolist() for lkv in caches] == [[0, 4, 5], [0, 4, 5]]
    # layers=max: a token ranks by its best share: fresh stores, best shares .75 (0), .625 (5), .25 (4), .125 (3)
    caches2 = []
    for acc in ([[6.0, 0.0, 0.0, 0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 1.0, 2.0, 5.0]]):
        lkv = LayerKV(1, 4, 64, torch.float32)
        lkv.append(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.arange(6))
        lkv.acc = torch.tensor(acc)
        caches2.append(lkv)
    make_policy("kvzip", budget=2, scope="shared", sinks=0, window=0, layers="max", kernel=1).compress_layers(dict(enumerate(caches2)), {})
    assert [lkv.view()[2].tolist() for lkv in caches2] == [[0, 5], [0, 5]]


def test_kvzip_probes_each_chunk_in_both_modes(monkeypatch) -> None:
    # KVzip scores by a re-read of each chunk, question or not: one compressed context for any question.
    model = tiny_model("llama", seed=7)
    runner = Runner(model, make_policy("kvzip", budget=40), ENGINE)
    seen: list[list[int]] = []
    real_probe = runner.probe_work
    monkeypatch.setattr(runner, "probe_work", lambda seq, probe_ids, then: seen.append(list(probe_ids)) or real_probe(seq, probe_ids, then))
    context = ids(100, seed=25)
    prefill_with_question(runner, runner.new_sequence(), context, ids(6, seed=24), "question-aware")
    assert seen[:4] == [context[0:32], context[32:64], context[64:96], context[96:100]]


def test_describe_names_every_knob() -> None:
    assert make_policy("kvzip", budget=64).describe() == "kvzip(budget=64, sinks=4, window=32, kernel=15, chunk=8, heads=max, scope=shared, layers=max)"
    assert make_policy("snapkv", budget=64, kv_quant="int4").describe() == "snapkv(budget=64, sinks=4, window=32, kernel=15, chunk=8, kv_quant=int4)"
    assert make_policy("dense:kv_quant=int8").describe() == "dense(kv_quant=int8)" and make_policy("dense").describe() == "dense"
    assert make_policy("streaming:budget=1024,kv_quant=int8").describe() == "streaming(budget=1024, sinks=4, window=1020, kv_quant=int8)"
    tail = ", kv_quant=int8, positions=original"  # every method names the storage knobs off their defaults
    for spec in ("streaming", "h2o", "pyramid", "adakv", "snapkv", "tova"):
        assert make_policy(f"{spec}:budget=256,kv_quant=int8,positions=original").describe().endswith(tail + ")"), spec
        assert "positions" not in make_policy(f"{spec}:budget=256").describe(), spec
