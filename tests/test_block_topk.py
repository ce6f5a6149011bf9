"""block_topk: page summaries, RoPE-consistent page scores, selection, positions, exactness vs dense."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from longkv.attention.sparse import (
    assigned_positions,
    attend_pages,
    candidate_pages,
    layout,
    page_scores,
    window_start,
)
from longkv.config import AttnSpec, EngineConfig, ModelConfig
from longkv.engine.runner import Runner
from longkv.errors import LongKVError
from longkv.kv.cache import LayerKV
from longkv.kv.summaries import PageSummaries
from longkv.models import build
from longkv.models.layers import Rotary, SequenceRotary
from longkv.policies import BlockTopKPolicy, DensePolicy, make_policy

PS = 8  # page size of the tiny tests
CPU = torch.device("cpu")


def tiny_model(max_position: int = 4096, seed: int = 0):
    """A 2-layer random Llama (4 heads / 2 KV heads, head_dim 16) in float32."""
    cfg = ModelConfig(
        arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, max_position=max_position,
    )
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": r(97, 64, scale=1.0), "model.norm.weight": torch.ones(64), "lm_head.weight": r(97, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": torch.ones(64), p + "post_attention_layernorm.weight": torch.ones(64),
            p + "self_attn.q_proj.weight": r(64, 64, scale=0.5), p + "self_attn.k_proj.weight": r(32, 64, scale=0.5),
            p + "self_attn.v_proj.weight": r(32, 64), p + "self_attn.o_proj.weight": r(64, 64),
            p + "mlp.gate_proj.weight": r(96, 64), p + "mlp.up_proj.weight": r(96, 64), p + "mlp.down_proj.weight": r(64, 96),
        }
    return build(cfg, w)


def filled_layer(n: int, seed: int = 0, hkv: int = 2, d: int = 16) -> tuple[LayerKV, Rotary]:
    """A layer cache of n random keys rotated at positions 0..n-1, as the engine stores them."""
    rope = Rotary(d, AttnSpec())
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(hkv, n, d, generator=g)
    lkv = LayerKV(hkv, d, page_size=PS)
    pos = torch.arange(n)
    lkv.append(rope.rotate(raw, pos), torch.randn(hkv, n, d, generator=g), pos)
    return lkv, rope


# ---------------------------------------------------------------- page summaries
def test_page_summaries_match_brute_force_over_appends() -> None:
    lkv, rope = filled_layer(0)
    full, _ = filled_layer(45, seed=3)
    summ = PageSummaries(2, 16, PS, CPU)
    k, v, pos = full.view()
    for lo, hi in ((0, 5), (5, 21), (21, 40), (40, 45)):  # partial pages across appends
        lkv.append(k[:, lo:hi], v[:, lo:hi], pos[lo:hi])
        summ.update(lkv, rope)
    assert summ.n_pages == 45 // PS
    raw = rope.rotate(k.float(), -pos)[:, : 5 * PS].unflatten(1, (5, PS))
    torch.testing.assert_close(summ.mean, raw.mean(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(summ.kmin, raw.amin(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(summ.kmax, raw.amax(2), rtol=0, atol=1e-5)


def test_page_scores_are_rope_consistent() -> None:
    lkv, rope = filled_layer(10 * PS)
    g = torch.Generator().manual_seed(1)
    q_raw = torch.randn(4, 3, 16, generator=g)  # 4 query heads over 2 KV heads
    q_pos = torch.arange(200, 203)
    q = rope.rotate(q_raw, q_pos)
    pages = torch.arange(2, 8)
    assumed = 150
    s = page_scores(q, lkv, pages, assumed, rope, "max")
    assert s.shape == (2, 6, 6)  # (Hkv, 2 query heads x 3 tokens, pages)
    s = s.amax(1)
    lse = torch.logsumexp(page_scores(q, lkv, pages, assumed, rope, "lse"), dim=1)  # over the 6 query rows
    # brute force: every page's keys moved to start at `assumed`, logits with the rotated queries
    k, _, pos = lkv.view()
    for j, p in enumerate(pages.tolist()):
        keys = rope.rotate(k[:, p * PS : (p + 1) * PS], torch.full((PS,), assumed - p * PS))
        for h in range(2):
            logits = q[2 * h : 2 * h + 2].reshape(-1, 16) @ keys[h].T
            assert s[h, j].item() == pytest.approx(logits.max().item(), abs=1e-4)
            assert lse[h, j].item() == pytest.approx(torch.logsumexp(logits.flatten() / 4.0, 0).item(), abs=1e-4)
    # the summaries: Quest's bound is >= the exact max; the mean-key gate is <= it
    summ = PageSummaries(2, 16, PS, CPU)
    summ.update(lkv, rope)
    bound = page_scores(q, lkv, pages, assumed, rope, "minmax", summ).amax(1)
    mean = page_scores(q, lkv, pages, assumed, rope, "mean", summ).amax(1)
    assert bool((bound >= s - 1e-4).all()) and bool((mean <= s + 1e-4).all())
    # mean gate == mean over the page's keys when they all sit at the assumed position
    raw = rope.rotate(k, -pos)[0, 2 * PS : 3 * PS]
    qe = rope.rotate(q[:2].reshape(-1, 16), torch.full((6,), -assumed))
    assert mean[0, 0].item() == pytest.approx((qe @ raw.mean(0)).max().item(), abs=1e-4)


# ---------------------------------------------------------------- layout and positions
def test_layout_always_includes_sinks_and_window() -> None:
    n, sinks, window = 20 * PS + 3, PS, 4 * PS
    w0 = window_start(n - 1, sinks, window, PS)
    assert w0 % PS == 0 and n - 1 - w0 >= window
    cand = candidate_pages(n - 1, sinks, window, PS, CPU)
    assert cand.tolist() == list(range(1, w0 // PS))
    idx = layout(n, w0, sinks, PS, torch.tensor([[3, 7]]), CPU)
    assert idx[0].tolist() == [*range(PS), *range(3 * PS, 4 * PS), *range(7 * PS, 8 * PS), *range(w0, n)]
    assert layout(n, w0, sinks, PS, None, CPU)[0].tolist() == [*range(PS), *range(w0, n)]


def test_assigned_positions_keep_window_true_and_stay_inside_span() -> None:
    lkv, _ = filled_layer(40 * PS)
    sinks, window, k = PS, 4 * PS, 3
    pages = torch.tensor([[2, 9, 20]])
    idx = layout(lkv.n, window_start(lkv.n - 1, sinks, window, PS), sinks, PS, pages, CPU)[0]
    target = assigned_positions(lkv.n - 1, idx.numel(), CPU)
    orig = lkv.view()[2][idx]
    w = idx.numel() - sinks - k * PS
    assert target[-w:].tolist() == orig[-w:].tolist()  # window at true positions
    assert int(target[-1] - target[0]) < sinks + k * PS + window + PS + 1  # every distance inside the span
    assert target[sinks + k * PS - 1].item() == orig[-w].item() - 1  # the pages sit just beyond the window


def test_attend_pages_equals_attention_over_moved_keys() -> None:
    lkv, rope = filled_layer(30 * PS)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 1, 16, generator=g)
    n = lkv.n
    pages = torch.tensor([[4, 11]])
    out = attend_pages(q, lkv, torch.tensor([n - 1]), rope, PS, 3 * PS, pages)
    # reference: gather by hand, rotate every key to its assigned position, softmax attention
    k, v, pos = lkv.view()
    w0 = window_start(n - 1, PS, 3 * PS, PS)
    idx = torch.cat((torch.arange(PS), torch.arange(4 * PS, 5 * PS), torch.arange(11 * PS, 12 * PS), torch.arange(w0, n)))
    keys = rope.rotate(k[:, idx], assigned_positions(n - 1, idx.numel(), CPU) - pos[idx])
    att = torch.softmax(q.view(2, 2, 16) @ keys.transpose(1, 2) / 4.0, dim=-1) @ v[:, idx]
    torch.testing.assert_close(out, att.reshape(4, 1, 16), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- end to end on a tiny model
def _run(model, policy, ids: list[int], decode: list[int], chunk: int = 16):
    runner = Runner(model, policy, EngineConfig(chunk_size=chunk, page_size=PS))
    seq = runner.new_sequence(len(ids) + len(decode))
    out = [runner.prefill(seq, ids)]
    out += [runner.decode(seq, t) for t in decode]
    return torch.stack(out), seq


@pytest.mark.parametrize("scope", ["shared", "layer", "head"])
def test_selecting_every_page_equals_dense(scope: str) -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    dense, _ = _run(model, DensePolicy(), ids, [5, 6, 7])
    pol = BlockTopKPolicy(topk=1000, prefill_topk=1000, sinks=PS, window=2 * PS, query_tokens=12, scope=scope,
                          dense_fallback=False)
    sparse, seq = _run(model, pol, ids, [5, 6, 7])
    assert seq.selection.pages[0] is not None and seq.selection.pages[0].shape[-1] == len(seq.selection.candidates)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-4)


def test_a_prompt_within_the_span_is_read_densely() -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(6)).tolist()
    dense, _ = _run(model, DensePolicy(), ids, [5, 6])
    pol = BlockTopKPolicy(dense_below=0, topk=2, sinks=PS, window=2 * PS, query_tokens=12, margin=0)  # span 8 + 48 + 16 + 8 + 16 = 96
    assert pol.span(EngineConfig(chunk_size=16, page_size=PS)) == 96
    short, seq = _run(model, pol, ids[:96], [5, 6])
    assert seq.selection.dense and seq.selection.pages[0] is None  # no selection pass
    ref, _ = _run(model, DensePolicy(), ids[:96], [5, 6])
    torch.testing.assert_close(short, ref, rtol=0, atol=1e-5)
    longer, seq = _run(model, pol, ids, [5, 6])  # 100 > span: selection and windows as usual
    assert not seq.selection.dense and (longer - dense).abs().max().item() > 1e-4
    # dense_below reads a prompt past the span densely too (where sparsity does not pay yet) ...
    below, seq = _run(model, dataclasses.replace(pol, dense_below=100), ids, [5, 6])
    assert seq.selection.dense
    torch.testing.assert_close(below, dense, rtol=0, atol=1e-5)
    # ... but never past the model's trained window.
    capped = dataclasses.replace(pol, dense_below=10**6).new_state(tiny_model(max_position=512).config, EngineConfig(chunk_size=16, page_size=PS))
    assert capped.dense_upto == 512


def test_local_only_differs_from_dense_and_question_selection_helps() -> None:
    # With topk=0 (sinks + window only) the logits must differ from dense: the test above is not vacuous.
    model = tiny_model()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    dense, _ = _run(model, DensePolicy(), ids, [])
    local, _ = _run(model, BlockTopKPolicy(dense_below=0, topk=0, sinks=PS, window=2 * PS, query_tokens=12), ids, [])
    assert (local - dense).abs().max().item() > 1e-3


def test_selection_is_fixed_for_the_answer_and_cache_intact() -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=3, sinks=PS, window=2 * PS, query_tokens=10, expand=0, margin=0)
    _, seq = _run(model, pol, ids, [1, 2, 3, 4])
    st = seq.selection
    assert all(p is st.pages[0] for p in st.pages) and st.pages[0].shape == (1, 3)
    assert st.z is not None and st.z.shape == (2, 2, len(st.candidates))
    assert seq.cache[0].n == 204 and seq.cache[0].view()[2].tolist() == list(range(204))  # scoring pass left no keys
    # the selection is the top-3 of the shared score
    assert st.score is not None and st.score.shape == (len(st.candidates),)
    best = st.candidates[st.score.topk(3).indices].sort().values
    assert st.pages[0][0].tolist() == best.tolist()


def test_expand_widens_the_span_by_the_neighbour_pages() -> None:
    pol = BlockTopKPolicy(topk=4, expand=1)
    eng = EngineConfig(chunk_size=512, page_size=64)
    assert pol.span(eng) == 64 + 12 * 64 + 1024 + 64 + 512  # 4 pages x (1 + 2 neighbours)


def test_mass_rows_are_attention_shares_over_the_pages() -> None:
    lkv, rope = filled_layer(12 * PS)
    q = rope.rotate(torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2)), torch.arange(300, 303))
    pol = BlockTopKPolicy(dense_below=0, sinks=PS, window=2 * PS)
    state = pol.new_state(tiny_model().config, EngineConfig(chunk_size=16, page_size=PS))
    cand, rows = pol._scores(state, 0, q, lkv, lkv.n, rope)
    assert rows.shape == (2, 6, cand.numel()) and bool((rows >= 0).all())
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 6))
    # the share follows the page's log-sum-exp: the best page by lse has the largest share in every row
    lse = page_scores(q, lkv, cand, window_start(lkv.n, PS, 2 * PS, PS) - PS, rope, "lse")
    assert torch.equal(rows.argmax(-1), lse.argmax(-1))


@pytest.mark.parametrize("score", ["mean", "minmax"])
def test_summary_scores_and_reselection_run(score: str) -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=2, prefill_topk=2, sinks=PS, window=2 * PS, query_tokens=10, score=score,
                          scope="head", keep_selection=False)
    logits, seq = _run(model, pol, ids, [1, 2])
    assert torch.isfinite(logits).all()
    assert seq.selection.summaries[0].n_pages == 202 // PS
    assert seq.selection.pages[1].shape == (2, 2)


# ---------------------------------------------------------------- user errors
def test_spec_parser_and_validation_errors() -> None:
    model = tiny_model(max_position=512)
    pol = make_policy("block_topk:topk=4,window=256,score=minmax,scope=layer,keep_selection=false")
    assert isinstance(pol, BlockTopKPolicy) and pol.topk == 4 and pol.window == 256 and pol.keep_selection is False
    eng = EngineConfig(chunk_size=64, page_size=PS)
    pol = pol.resolve(model.config, eng)
    assert pol.max_context(model.config) is None
    bad = {
        "topk=-1": "topk must be >= 0, got -1",
        "expand=-1": "expand must be >= 0, got -1",
        "dense_below=-1": "dense_below must be >= 0, got -1",
        "resident=lots": "cannot read 'lots' as a size",
        "resident=1KiB": "cannot hold the sinks, window and a chunk",
        "resident=1GiB,cold=tape": "unknown block_topk cold tier 'tape'",
        "resident=1GiB,cold_codec=fp8": "unknown block_topk cold_codec 'fp8'",
        "cold=cloud": "unknown block_topk cold tier 'cloud'",  # checked with or without resident
        "cold=ram": r"cold=ram only applies to a tiered cache: add resident=SIZE \(e.g. block_topk:resident=1GiB,cold=ram\)",
        "tier_dir=/tmp,cold_codec=int4": "cold_codec=int4, tier_dir=/tmp only applies to a tiered cache",
        "window=0": "window must be >= 1",
        "query_tokens=0": "query_tokens must be >= 1",
        "votes=0": "votes must be >= 1",
        "score=cosine": "unknown block_topk score 'cosine'",
        "scope=token": "unknown block_topk scope 'token'",
        "aggregate=sum": "unknown block_topk aggregate 'sum'",
        "window=500": "beyond the model's trained window of 512",
        "heads=7": "bad block_topk heads '7'",
        "heads=0.1+x.2": "bad block_topk heads",
        "heads=2.0": "head 2.0 is not in this model",
        "heads=1.4": "head 1.4 is not in this model",
    }
    for knob, message in bad.items():
        with pytest.raises(LongKVError, match=message):
            make_policy(f"block_topk:{knob}").resolve(model.config, eng)
    with pytest.raises(LongKVError, match="no knob 'k'"):
        make_policy("block_topk:k=4")
    with pytest.raises(LongKVError, match=r"no knob 'topK': did you mean block_topk:topk=\.\.\.\?"):
        make_policy("block_topk:topK=2")
    with pytest.raises(LongKVError, match="bad value 'ture' for block_topk.reencode: expected true or false"):
        make_policy("block_topk:reencode=ture")  # a typo must not silently turn re-encoding off
    assert make_policy("block_topk:reencode=off").reencode is False and make_policy("block_topk:reencode=Yes").reencode is True
    with pytest.raises(LongKVError, match="bad value '2;expand=1' for block_topk.topk: expected a whole number, or auto.*separate knobs with commas"):
        make_policy("block_topk:topk=2;expand=1")
    with pytest.raises(LongKVError, match="knob 'topk' needs a value"):
        make_policy("block_topk:topk")
    # the smallest resident the error names is really enough
    with pytest.raises(LongKVError, match=r"needs >= (\d+) MiB") as err:
        make_policy("block_topk:resident=10KiB,window=256").resolve(model.config, eng)
    enough = int(re.search(r"needs >= (\d+) MiB", str(err.value)).group(1))  # type: ignore[union-attr]
    make_policy(f"block_topk:resident={enough}MiB,window=256").resolve(model.config, eng)
    # sinks + 1 page and its 2 neighbours + window + page + chunk
    assert dataclasses.replace(pol, topk=1).span(eng) == 64 + 3 * PS + 256 + PS + 64
    assert dataclasses.replace(pol, query_tokens=100, expand=0).span(eng) == 64 + 4 * PS + 256 + PS + 100


def test_retrieval_heads_score_is_the_mean_log_share_of_those_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkv.policies import retrieval_heads

    model = tiny_model()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    heads = [(1, 0), (0, 3), (1, 2)]  # (layer, query head); query heads 0-1 read KV head 0, 2-3 KV head 1
    pol = BlockTopKPolicy(dense_below=0, topk=2, sinks=PS, window=2 * PS, query_tokens=12, heads="1.0+0.3+1.2", reencode=False,
                          expand=0)
    rows: list[torch.Tensor] = []
    scores = pol._scores

    def keep(*args):  # type: ignore[no-untyped-def]
        cand, z = scores(*args)
        rows.append(z)  # (Hkv, G * T, C), head-major inside each KV head
        return cand, z

    monkeypatch.setattr(pol, "_scores", keep)
    _, seq = _run(model, pol, ids, [])
    st = seq.selection
    shares = [z.reshape(2, 2, 12, -1).flatten(0, 1) for z in rows]  # per layer (query head, query, page)
    expected = torch.stack([shares[layer][h].mean(0).clamp_min(1e-6).log() for layer, h in heads]).mean(0)
    torch.testing.assert_close(st.score, expected)
    assert st.pages[0][0].tolist() == st.candidates[expected.topk(2).indices].sort().values.tolist()
    # a request that names its question (its last 5 tokens): only their queries rate the pages, not
    # the heading and text before them that the question part also holds
    rows.clear()
    runner = Runner(model, pol, EngineConfig(chunk_size=16, page_size=PS))
    named = runner.new_sequence(len(ids))
    assert named.selection is not None
    named.selection.question_tokens = 5
    runner.prefill(named, ids)
    assert [z.shape[1] for z in rows] == [2 * 5, 2 * 5]  # (Hkv, G * 5 queries, C) in both layers
    last5 = torch.stack([shares[layer][h][-5:].mean(0).clamp_min(1e-6).log() for layer, h in heads]).mean(0)
    torch.testing.assert_close(named.selection.score, last5)
    assert not torch.equal(last5, expected)
    assert st.z is None  # the per-head votes of every layer are not computed
    rows.clear()
    one = dataclasses.replace(pol, heads="1.2")
    scores = one._scores
    monkeypatch.setattr(one, "_scores", keep)
    _, seq_one = _run(model, one, ids, [])
    assert len(rows) == 1  # only layer 1 holds a retrieval head: layer 0 is not scored
    torch.testing.assert_close(seq_one.selection.score, shares[1][2].mean(0).clamp_min(1e-6).log())
    # "all" votes over every row; "auto" is "all" for a model longkv has no calibration for, and the table otherwise
    all_rows, _ = _run(model, dataclasses.replace(pol, heads="all"), ids, [])
    auto, seq_auto = _run(model, dataclasses.replace(pol, heads="auto"), ids, [])
    torch.testing.assert_close(auto, all_rows, rtol=0, atol=0)
    assert not torch.equal(seq_auto.selection.score, st.score)
    monkeypatch.setitem(retrieval_heads.KNOWN, retrieval_heads.fingerprint(model.config), tuple(heads))
    assert retrieval_heads.fingerprint(model.config) == "llama:2x4x2x16:64:97"
    _, seq_known = _run(model, dataclasses.replace(pol, heads="auto"), ids, [])
    torch.testing.assert_close(seq_known.selection.score, st.score)


def test_the_engine_tells_the_policy_how_long_the_question_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkv.engine.engine import Engine, Request
    from longkv.engine.sampling import SamplingParams

    model = tiny_model()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=2, sinks=PS, window=2 * PS, query_tokens=12, reencode=False)
    seen: list[int] = []
    select = BlockTopKPolicy.select

    def spy(self, state, *args):  # type: ignore[no-untyped-def]
        seen.append(state.question_tokens)
        return (yield from select(self, state, *args))

    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, ids))

    monkeypatch.setattr(BlockTopKPolicy, "select", spy)
    engine = Engine(model, Tok(), frozenset(), EngineConfig(chunk_size=16, page_size=PS))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for question in (ids[-7:], ids[10:17], None):  # the prompt's end; tokens elsewhere (not the question); none
        engine.add_request(Request(ids, params, pol, question_ids=question))
        while engine.has_unfinished():
            engine.step()
    assert seen == [7, 0, 0]


def test_topk_auto_is_one_page_with_calibrated_heads_and_two_when_every_row_votes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from longkv.policies import retrieval_heads

    model = tiny_model()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    eng = EngineConfig(chunk_size=16, page_size=PS)
    pol = make_policy(f"block_topk:topk=auto,sinks={PS},window={2 * PS},query_tokens=12,expand=0,reencode=false,dense_below=0,margin=0")
    assert isinstance(pol, BlockTopKPolicy) and pol.topk is None and pol.describe().startswith("block_topk(topk=auto,")
    assert pol.span(eng) == PS + 2 * PS + 2 * PS + PS + 16  # before a model is known: the larger value, 2 pages
    auto = pol
    pol = auto.resolve(model.config, eng)  # no calibration for this model: every row votes, 2 pages
    assert pol.k(model.config) == 2 and "topk=2," in pol.describe() and auto.topk is None  # a resolved copy
    _, seq = _run(model, pol, ids, [])
    assert seq.selection.pages[0].shape[-1] == 2
    monkeypatch.setitem(retrieval_heads.KNOWN, retrieval_heads.fingerprint(model.config), ((1, 0), (0, 3)))
    calibrated = auto.resolve(model.config, eng)
    assert calibrated.k(model.config) == 1 and "topk=1," in calibrated.describe()
    assert calibrated.span(eng, model.config) == dataclasses.replace(pol, topk=2).span(eng) - PS  # a page less
    _, seq = _run(model, calibrated, ids, [])
    assert seq.selection.pages[0].shape[-1] == 1
    assert seq.selection.pages[0][0].item() == seq.selection.candidates[seq.selection.score.argmax()].item()
    # every row votes (heads=all, or a per-layer scope): 2 pages; an explicit topk always wins
    assert dataclasses.replace(auto, heads="all").k(model.config) == 2
    assert dataclasses.replace(auto, scope="layer").k(model.config) == 2
    assert dataclasses.replace(auto, topk=3).k(model.config) == 3
    assert make_policy("block_topk:topk=0").k(model.config) == 0


def test_margin_reads_every_page_whose_score_is_close_to_the_best(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkv.policies import retrieval_heads

    pol = BlockTopKPolicy(margin=0.5, topk_max=3)
    score = torch.tensor([-1.0, -1.3, -1.6, -3.0, -1.2, -1.45])  # log shares: 4 pages within 0.5 of the best
    assert pol.close_pages(score, 1, log_units=True) == 3  # at most topk_max
    assert dataclasses.replace(pol, topk_max=8).close_pages(score, 1, log_units=True) == 4
    assert dataclasses.replace(pol, margin=0).close_pages(score, 1, log_units=True) == 1
    assert pol.close_pages(score, 5, log_units=True) == 5  # never fewer than topk
    # vote shares compare by their log: 0.3 is within e^-0.5 (~0.61) of 0.4, 0.2 is not
    assert pol.close_pages(torch.tensor([0.4, 0.3, 0.1, 0.2]), 1, log_units=False) == 2
    # end to end with calibrated heads: the pages read are the best ones whose score is within the margin
    model = tiny_model()
    monkeypatch.setitem(retrieval_heads.KNOWN, retrieval_heads.fingerprint(model.config), ((1, 0), (0, 3)))
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    eng = EngineConfig(chunk_size=16, page_size=PS)
    base = make_policy(f"block_topk:sinks={PS},window={2 * PS},query_tokens=12,expand=0,reencode=false,dense_below=0")
    for margin, topk_max, n in ((0.2, 4, 2), (0.5, 4, 4), (0.5, 8, 5), (0.0, 4, 1)):
        pol = dataclasses.replace(base, margin=margin, topk_max=topk_max).resolve(model.config, eng)
        _, seq = _run(model, pol, ids, [])
        st = seq.selection
        close = int((st.score >= st.score.max() - margin).sum())
        assert min(close, topk_max) == n  # the crafted cases cover one page, two, and the cap
        assert st.pages[0][0].tolist() == st.candidates[st.score.topk(n).indices].sort().values.tolist()
    # the span (and the trained-window check) counts the most pages the margin may bring
    assert BlockTopKPolicy(topk=1).span(eng) == 64 + 4 * 3 * PS + 1024 + PS + 32  # block: query_tokens (32) > chunk (16)
    assert BlockTopKPolicy(topk=1, margin=0).span(eng) == 64 + 3 * PS + 1024 + PS + 32
    assert BlockTopKPolicy(topk=1, verify=2).span(eng) == 64 + 3 * PS + 1024 + PS + 32  # verify keeps exactly topk
    with pytest.raises(LongKVError, match="topk_max"):
        BlockTopKPolicy(topk=1, window=256, sinks=PS).resolve(tiny_model(max_position=300).config, eng)
    with pytest.raises(LongKVError, match="margin must be >= 0"):
        make_policy("block_topk:margin=-0.5")
    with pytest.raises(LongKVError, match="topk_max must be >= 1"):
        make_policy("block_topk:topk_max=0")


def test_reencoded_pages_are_the_dense_encoding_of_sinks_plus_pages() -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (240,), generator=torch.Generator().manual_seed(6)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=3, sinks=PS, window=2 * PS, query_tokens=10)
    _, seq = _run(model, pol, ids, [])
    st = seq.selection
    assert st.prefix is not None and len(st.prefix) == 2
    pages = st.pages[0][0]
    idx = torch.cat((torch.arange(PS), (pages[:, None] * PS + torch.arange(PS)).flatten()))
    # the same tokens as one short text through the dense path
    _, ref_seq = _run(model, DensePolicy(), [ids[i] for i in idx.tolist()], [])
    for layer, (k, v, pos) in enumerate(st.prefix):
        rk, rv, _ = ref_seq.cache[layer].view()
        torch.testing.assert_close(k, rk, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=0, atol=1e-5)
        assert pos.tolist() == idx.tolist()  # original positions, for the causal mask
    # a later question under a policy without re-encoding must not reuse these pages
    runner = Runner(model, dataclasses.replace(pol, reencode=False), EngineConfig(chunk_size=16, page_size=PS))
    for lkv in seq.cache.layers:
        lkv.truncate(230)
    del seq.tokens[230:]
    runner.ask(seq, ids[230:])
    assert seq.selection.prefix is None and seq.selection.pages[0] is not None
    # without re-encoding the answer differs (the cached pages come from the local prefill)
    plain, _ = _run(model, dataclasses.replace(pol, reencode=False), ids, [])
    with_prefix, _ = _run(model, pol, ids, [])
    assert (plain - with_prefix).abs().max().item() > 1e-4


def test_verify_ranks_pages_by_the_confidence_of_the_answer_read_from_each() -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (240,), generator=torch.Generator().manual_seed(8)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=2, sinks=PS, window=2 * PS, query_tokens=10, expand=1, verify=4, verify_tokens=5)
    _, seq = _run(model, pol, ids, [])
    st = seq.selection
    assert st.first_score is not None and st.score is not None and st.candidates is not None and st.confidence is not None
    order = st.first_score.topk(4).indices  # the first stage's 4 best, best first
    expected = []
    for c in order.tolist():  # brute force: sinks + the page and its neighbours + the question, greedy through the engine
        near = [p for p in (c - 1, c, c + 1) if 0 <= p < st.candidates.numel()]
        idx = list(range(PS)) + [int(st.candidates[p]) * PS + t for p in near for t in range(PS)]
        runner = Runner(model, DensePolicy(), EngineConfig(chunk_size=16, page_size=PS))
        ref = runner.new_sequence(len(idx) + 10 + 5)
        logits = runner.prefill(ref, [ids[i] for i in idx] + ids[230:])
        total = 0.0
        for _ in range(5):
            logp = torch.log_softmax(logits.reshape(-1)[-97:].float(), -1)
            tok = int(logp.argmax())
            total += float(logp[tok])
            logits = runner.decode(ref, tok)
        expected.append(total / 5)
    torch.testing.assert_close(st.confidence, torch.tensor(expected), rtol=0, atol=1e-4)
    torch.testing.assert_close(st.score[order], st.confidence)
    rest = torch.ones(st.candidates.numel(), dtype=torch.bool)
    rest[order] = False  # unverified pages: below every verified one, in first-stage order
    assert st.score[rest].max() < st.score[order].min()
    assert torch.equal(st.score[rest].argsort(), st.first_score[rest].argsort())
    best = order[st.confidence.topk(2).indices]  # the two most confident, with their neighbours
    near = (best[:, None] + torch.arange(-1, 2)).flatten()
    assert st.pages[0][0].tolist() == st.candidates[near[(near >= 0) & (near < st.candidates.numel())].unique()].tolist()
    assert "verify=4, verify_tokens=5" in pol.describe()
    # off (the default): the first stage's score is the selection's
    _, seq = _run(model, dataclasses.replace(pol, verify=0), ids, [])
    assert seq.selection.confidence is None and torch.equal(seq.selection.score, seq.selection.first_score)
    assert "verify" not in BlockTopKPolicy().describe()
    with pytest.raises(LongKVError, match="verify must be >= 0, got -1"):
        make_policy("block_topk:verify=-1")
    with pytest.raises(LongKVError, match="verify_tokens must be >= 1, got 0"):
        make_policy("block_topk:verify_tokens=0")


def test_the_policy_plans_and_the_engine_runs_its_needs_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    # the policy never calls the model: its question probe, the texts it verifies and its
    # re-encoding are work the engine runs, the verified texts side by side in one forward
    model = tiny_model()
    ids = torch.randint(0, 97, (240,), generator=torch.Generator().manual_seed(8)).tolist()
    pol = BlockTopKPolicy(dense_below=0, topk=2, sinks=PS, window=2 * PS, query_tokens=10, expand=1, verify=3, verify_tokens=4)
    runner = Runner(model, pol, EngineConfig(chunk_size=64, page_size=PS))
    seq = runner.new_sequence(260)
    runner.prefill(seq, ids[:230])
    real, rows = model.forward, []

    def counting(ids_, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(ids_.numel())
        return real(ids_, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    runner.ask(seq, ids[230:])
    # probe; the 3 texts' prefills (sinks + 3 pages + question = 42 tokens each); their 3 further
    # greedy tokens; the sinks + chosen pages re-encoded (<= 8 + 2 * 3 pages); the question
    assert rows[:5] == [10, 3 * 42, 3, 3, 3] and rows[-1] == 10 and len(rows) == 7
    assert 8 + 2 * 8 <= rows[5] <= 8 + 6 * 8 == 56 and rows[5] == PS + seq.selection.pages[0].numel() * PS
    assert seq.cache[0].n == 240 and len(seq.tokens) == 240


def test_a_request_cancelled_while_its_needs_run_gives_every_page_back() -> None:
    from longkv.engine.engine import Engine, Request
    from longkv.engine.sampling import SamplingParams

    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "x" * len(ids)

    model = tiny_model()
    pol = BlockTopKPolicy(dense_below=0, topk=1, sinks=PS, window=2 * PS, query_tokens=8, verify=2, verify_tokens=3)
    engine = Engine(model, Tok(), frozenset(), EngineConfig(chunk_size=16, page_size=PS))
    prompt = torch.randint(1, 97, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    req = Request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), pol)
    engine.add_request(req)
    before = None  # pages in use once the context is in
    for _ in range(50):  # until the verified texts hold pages of their own
        engine.step()
        o = engine.running[0]
        need = o.plan._need if o.plan is not None else None
        if need is None:
            continue
        before = engine.pools.used_pages() if before is None else before
        if any(t.seq is not None and t.seq.tokens for t in need._texts):
            break
    else:
        raise AssertionError("the verify texts never ran")
    assert before is not None and engine.pools.used_pages() > before
    engine.abort(req.request_id)
    outs = [e.output for e in engine.step() if e.finished]
    assert [o.finish_reason for o in outs] == ["cancelled"] and not engine.has_unfinished()
    assert engine.pools.used_pages() == 0


def test_auto_policy_uses_block_topk_beyond_the_window_tiered_when_the_cache_is_too_big() -> None:
    from longkv.engine.llm import LLM

    def llm_for(max_position: int) -> LLM:
        llm = LLM.__new__(LLM)  # resolve_policy needs only the configs, not weights
        llm.config = tiny_model(max_position=max_position).config
        llm.engine_config = EngineConfig(dtype="bfloat16")
        llm._default_policy, llm._default_budget = None, None
        return llm

    llm = llm_for(8192)
    assert llm.resolve_policy(100).name == "dense"
    assert llm.resolve_policy(20_000).name == "block_topk"
    per_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads, head_dim 16, bfloat16
    big = llm.resolve_policy(LLM.auto_block_topk_bytes // per_token + 1)  # all pages would not fit: tiered
    assert isinstance(big, BlockTopKPolicy) and big.resident == str(LLM.auto_block_topk_bytes) and big.cold == "disk"
    assert isinstance(llm.resolve_policy(20_000), BlockTopKPolicy) and not llm.resolve_policy(20_000).resident
    assert llm.resolve_policy(20_000, budget=1024).name == "streaming"  # a budget asks for eviction
    assert llm_for(1800).resolve_policy(20_000).name == "streaming"  # block_topk's span (1856) exceeds the window
    # dense up to the whole window (ask, generate and the server alike), block_topk one token past it
    assert llm.resolve_policy(8192).name == "dense"
    assert llm.resolve_policy(8193).name == "block_topk"
    assert llm.resolve_policy(5000, "block_topk").name == "block_topk"  # asked for by name inside the window
    with pytest.raises(LongKVError, match=r"a budget \(512 tokens\) was given with the dense policy"):
        llm.resolve_policy(100, "dense", budget=512)  # not silently ignored
    with pytest.raises(LongKVError, match="under the dense policy: .* use the block_topk policy"):
        llm.resolve_policy(9000, "dense")
    with pytest.raises(LongKVError, match=r"streaming\(budget=1024, .*positions=original\) policy: .*drop positions=original"):
        llm.resolve_policy(9000, "streaming:budget=1024,positions=original")  # the advice is not "use streaming"
    assert llm.resolve_policy(9000, "streaming:budget=1024").name == "streaming"  # contiguous positions: any length
    with pytest.raises(LongKVError, match=r"token id 99999 is outside the vocabulary \[0, "):
        llm.check_ids([1, 2, 99999])  # what generate and generate_batch check before anything runs
    for bad in (-1, 2.0, True):
        with pytest.raises(LongKVError, match="outside the vocabulary"):
            llm.check_ids([1, bad])
    for msgs in ([{"role": "user"}], [{"role": "wizard", "content": "x"}], ["hi"]):
        with pytest.raises(LongKVError, match="is not a chat message: pass"):
            llm.chat(msgs)  # refused before the template renders


def test_rotary_reuses_its_last_table_only_for_the_same_positions_and_dtype() -> None:
    model_rope = tiny_model().ropes[0]
    a = torch.tensor([-5, 0, 7, 1000])
    assert model_rope.cos_sin(a, torch.float32)[0] is not model_rope.cos_sin(a, torch.float32)[0]  # the model keeps no state
    rope = SequenceRotary(model_rope)  # a runner's own memo

    def fresh(pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos.to(torch.float64)[:, None] * rope.inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    a = torch.tensor([-5, 0, 7, 1000])
    first = rope.cos_sin(a, torch.float32)
    assert rope.cos_sin(a.clone(), torch.float32)[0] is first[0]  # same deltas (the next layer): reused
    a[0] = 3  # the caller's tensor changes afterwards: the table it was made from does not
    for pos, dtype in ((a, torch.float32), (torch.tensor([-5, 0, 7, 1000]), torch.bfloat16), (torch.tensor([1, 2]), torch.float32)):
        cos, sin = rope.cos_sin(pos, dtype)
        ref = fresh(pos, dtype)
        assert cos.dtype == dtype and torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])


def test_stats_line_names_the_dense_fallback_and_reads_back_as_a_spec(tiny_llama: Path) -> None:
    """A prompt within dense_below says it was read densely; the policy text parses back to the same policy."""
    from longkv.engine.llm import LLM

    llm = LLM(model=tiny_llama, dtype="float32", chunk_size=64)
    spec = "block_topk:sinks=64,window=128,query_tokens=16,topk=1,margin=0"  # span 64 + 3 x 64 + 128 + 64 + 64 = 512, the tiny window
    ids = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    short = llm.generate(ids[:100], max_new_tokens=2, policy=spec)
    long = llm.generate(ids, max_new_tokens=2, policy=spec)
    assert short.stats.policy.endswith("), prompt read densely")
    assert "read densely" not in long.stats.policy and long.stats.policy.startswith("block_topk(topk=1,")
    inner = long.stats.policy[len("block_topk(") : -1].replace(" ", "")
    assert make_policy(f"block_topk:{inner}").describe() == long.stats.policy
