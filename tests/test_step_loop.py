"""The step loop: batched forwards over sequences of mixed policies, joining and leaving, equal each alone.

A tiny random Llama in float32 (no model file needed). Logits of a sequence run in
a mixed batch (prompt chunks and decode tokens, dense and evicting and selecting
policies, sequences arriving and finishing mid-run) are compared with the same
sequence run alone to 1e-4; engine outputs are compared token for token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_llama_weights, staggered_batches

from longkv.config import EngineConfig, ModelConfig
from longkv.engine.detokenizer import Detokenizer, StopFilter
from longkv.engine.engine import Engine, Request, RequestOutput, TokenEvent
from longkv.engine.runner import Runner, Sequence
from longkv.engine.sampling import SamplingParams
from longkv.errors import LongKVError
from longkv.models import build
from longkv.policies import KVPolicy, make_policy

CFG = ModelConfig(
    arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, max_position=2048, eos_token_ids=(0,),
)  # fmt: skip
ENGINE = EngineConfig(chunk_size=16, page_size=8, dtype="float32")
POLICIES = [
    "dense",
    "streaming:budget=40,sinks=4",
    "snapkv:budget=40",
    "h2o:budget=40",
    "adakv:budget=40",
    "kvzip:budget=40",
    "block_topk:sinks=8,window=32,query_tokens=8,topk=2,dense_below=0,verify=3,verify_tokens=2",  # needs: probe, texts, re-encoding
]



def _kept(seq: Sequence) -> Sequence:
    """What an ``on_release`` hook keeps of a sequence: a copy-on-write fork (the engine frees the original next)."""
    return Sequence(seq.cache.fork(), list(seq.tokens))

def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_llama_weights(CFG, seed, 0.3)


class _Tok:
    """Token t decodes as the letter chr(97 + t % 26); 0 is the EOS (skipped)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids if t != 0 or not skip_special_tokens)


MODEL = build(CFG, _weights())


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _policy(spec: str) -> KVPolicy:
    pol = make_policy(spec)
    pol = pol.resolve(CFG, ENGINE)
    return pol


def _alone(spec: str, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Logits after the prompt and after each of ``steps`` greedy tokens, the sequence run alone."""
    runner = Runner(MODEL, _policy(spec), ENGINE)
    seq = runner.new_sequence()
    out = [runner.prefill(seq, prompt)]
    for _ in range(steps):
        out.append(runner.decode(seq, int(out[-1].argmax())))
    return out


def test_mixed_batch_logits_equal_each_sequence_alone() -> None:
    """Every policy in one batch; sequence i joins at step 2 i and leaves after its tokens."""
    steps = 6
    prompts = [_ids(40 + 23 * i, seed=i) for i in range(len(POLICIES))]
    want = [_alone(spec, p, steps) for spec, p in zip(POLICIES, prompts, strict=True)]
    got, batches = staggered_batches(MODEL, [Runner(MODEL, _policy(spec), ENGINE) for spec in POLICIES], prompts, steps)
    widest = max(map(len, batches))
    assert widest >= 4  # prompt chunks and decode tokens of several policies really shared forwards
    for spec, g, w in zip(POLICIES, got, want, strict=True):
        assert len(g) == len(w), spec
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=spec)


def _engine(max_num_seqs: int = 8, max_step_tokens: int | None = None) -> Engine:
    return Engine(MODEL, _Tok(), frozenset({0}), ENGINE, max_num_seqs, max_step_tokens)


def _drain(engine: Engine) -> dict[str, tuple[RequestOutput, str]]:
    texts: dict[str, list[str]] = {}
    outs: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            texts.setdefault(ev.request_id, []).append(ev.text)
            if ev.finished:
                outs[ev.request_id] = ev.output
    return {rid: (out, "".join(texts[rid])) for rid, out in outs.items()}


def test_engine_requests_joining_and_leaving_equal_each_alone() -> None:
    params = [
        SamplingParams(max_new_tokens=5 + 3 * i, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)
        for i in range(len(POLICIES))
    ]
    prompts = [_ids(30 + 17 * i, seed=10 + i) for i in range(len(POLICIES))]
    alone = []
    for spec, p, sp in zip(POLICIES, prompts, params, strict=True):
        e = _engine()
        rid = e.add_request(Request(p, sp, _policy(spec)))
        alone.append(_drain(e)[rid])
    engine = _engine(max_num_seqs=3)  # at most 3 at once: the others join as sequences finish
    rids = [engine.add_request(Request(p, sp, _policy(spec))) for spec, p, sp in zip(POLICIES, prompts, params, strict=True)]
    together = _drain(engine)
    for spec, rid, (out, text) in zip(POLICIES, rids, alone, strict=True):
        got, got_text = together[rid]
        assert got.token_ids == out.token_ids and got_text == text, spec
        assert got.finish_reason == "length" and got.prompt_tokens == out.prompt_tokens
    assert engine.steps < sum(len(o.token_ids) + -(-len(p) // 16) for (o, _), p in zip(alone, prompts, strict=True))
    assert engine.kv_bytes() == 0 and not engine.running


def test_a_short_request_overtakes_a_long_prefill() -> None:
    engine = _engine()
    long_id = engine.add_request(Request(_ids(400, seed=1), SamplingParams(max_new_tokens=4, ignore_eos=True), _policy("dense")))
    for _ in range(3):
        engine.step()  # three chunks of the long prompt
    short_id = engine.add_request(Request(_ids(10, seed=2), SamplingParams(max_new_tokens=4, ignore_eos=True), _policy("dense")))
    events: list[TokenEvent] = engine.step()
    assert [e.request_id for e in events] == [short_id]  # its first token after one step...
    long_events: list[TokenEvent] = []
    while engine.has_unfinished():
        long_events += [e for e in engine.step() if e.request_id == long_id]
    assert long_events[0].output.prefill_end > events[0].output.first_token  # ...while the long prompt still prefilled


def test_step_token_budget_mixes_decode_tokens_with_a_prompt_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(max_step_tokens=20)
    sizes: list[int] = []
    real = MODEL.forward

    def counting(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(ids.shape[0])
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(MODEL, "forward", counting)
    prompts = [_ids(20, seed=7), _ids(50, seed=8), _ids(50, seed=9)]
    rids = [engine.add_request(Request(p, SamplingParams(max_new_tokens=6, ignore_eos=True), _policy("snapkv:budget=40"))) for p in prompts]
    outs = _drain(engine)
    assert all(len(outs[r][0].token_ids) == 6 for r in rids)
    # 16-token chunks (the second of a step would pass the budget), decode tokens beside them
    assert max(sizes) <= 20 and any(s > 16 for s in sizes)
    assert sum(sizes) == sum(map(len, prompts)) + 3 * 5  # every token fed once (the last sampled is not fed)


def test_abort_waiting_and_running_and_the_kv_is_freed() -> None:
    engine = _engine(max_num_seqs=1)
    released: list[Sequence] = []
    a = Request(_ids(100, seed=3), SamplingParams(max_new_tokens=30, ignore_eos=True), _policy("dense"), on_release=lambda s, o: released.append(_kept(s)))
    b = Request(_ids(20, seed=4), SamplingParams(max_new_tokens=30, ignore_eos=True), _policy("dense"))
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1 and engine.kv_bytes() > 0
    engine.abort(b.request_id)  # waiting
    engine.abort(a.request_id)  # mid-prefill
    events = engine.step()
    assert sorted(e.output.finish_reason or "" for e in events) == ["cancelled", "cancelled"]
    assert not engine.has_unfinished() and engine.kv_bytes() == 0
    assert len(released) == 1 and released[0].cache.tokens() == [len(released[0].tokens)] * CFG.n_layers


def test_a_failing_forward_ends_its_requests_and_the_engine_serves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine()
    real = MODEL.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(MODEL, "forward", flaky)
    rid = engine.add_request(Request(_ids(40, seed=5), SamplingParams(max_new_tokens=5), _policy("dense")))
    out, _ = _drain(engine)[rid]
    assert out.finish_reason == "error" and isinstance(out.error, RuntimeError) and engine.kv_bytes() == 0
    rid = engine.add_request(Request(_ids(40, seed=5), SamplingParams(max_new_tokens=5, ignore_eos=True), _policy("dense")))
    out, _ = _drain(engine)[rid]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_a_request_whose_cache_cannot_be_made_ends_alone() -> None:
    """A policy that cannot make its pages (an unknown codec that skipped ``resolve``) fails its own request at
    admission; the request beside it runs to the end, and nothing stays reserved."""
    engine = _engine()
    bad = make_policy("dense")
    bad.kv_quant = "int2"
    good = engine.add_request(Request(_ids(40, seed=6), SamplingParams(max_new_tokens=4, ignore_eos=True), _policy("dense")))
    rid = engine.add_request(Request(_ids(30, seed=7), SamplingParams(max_new_tokens=4), bad))
    outs = _drain(engine)
    assert outs[rid][0].finish_reason == "error" and "unknown kv_quant 'int2'" in str(outs[rid][0].error)
    assert outs[good][0].finish_reason == "length" and len(outs[good][0].token_ids) == 4
    assert engine.kv_bytes() == 0 and not engine.running and not engine.waiting


def test_resolve_refuses_an_unknown_codec_for_every_policy() -> None:
    for spec in ("dense:kv_quant=int2", "block_topk:kv_quant=fp8", "streaming:budget=40,kv_quant=int3"):
        with pytest.raises(LongKVError, match="unknown kv_quant"):
            make_policy(spec).resolve(CFG, ENGINE)


def test_bad_requests_are_refused() -> None:
    engine = _engine()
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request(Request([], SamplingParams(), _policy("dense")))
    seq = Runner(MODEL, _policy("dense"), ENGINE).new_sequence()
    seq.tokens = [5, 6]
    with pytest.raises(ValueError, match="prefix of its prompt"):
        engine.add_request(Request([5, 7, 8], SamplingParams(), _policy("dense"), sequence=seq))
    with pytest.raises(ValueError, match="max_num_seqs"):
        _engine(max_num_seqs=0)


# --------------------------------------------------------------------------- detokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_qwen2: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2))


@pytest.mark.parametrize("text", ["The quick brown fox", "naïve café, 世界 和平 🎉🎉 ok", "tabs\tand\nnewlines  twice"])
def test_incremental_detokenizer_equals_a_whole_decode(byte_tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    d = Detokenizer(byte_tokenizer)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == byte_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # a character split over byte tokens comes out whole
    if any(ord(c) > 127 for c in text):
        assert "" in pieces[:-1]  # ...once its last byte is in


def test_detokenizer_emits_invalid_bytes_as_they_come(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = byte_tokenizer.encode("🎉", add_special_tokens=False)[:1] * 40  # a lone lead byte, again and again
    d = Detokenizer(byte_tokenizer)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == byte_tokenizer.decode(ids)[:-1] and sum(1 for p in pieces if p) > 2  # the last lead byte starts no character


def test_a_character_cut_off_at_the_end_is_left_out(byte_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Output cut by max_tokens inside a multi-byte character ends before it, not in U+FFFD."""
    ids = byte_tokenizer.encode("ok 世界", add_special_tokens=False)
    assert byte_tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the last character's final byte token is cut off
    d = Detokenizer(byte_tokenizer)
    assert "".join([d.add(t) for t in ids[:-1]] + [d.flush()]) == "ok 世"


def test_stop_filter_holds_a_possible_stop_and_cuts_at_a_whole_one() -> None:
    f = StopFilter(("END", "\n\n"))
    assert f.push("abc E") == ("abc ", False)
    assert f.push("N") == ("", False)
    assert f.push("x") == ("ENx", False)  # not a stop after all: released
    assert f.push("yy\n") == ("yy", False)
    assert f.push("\nrest") == ("", True)
    g = StopFilter(("END",))
    assert g.push("aEN") == ("a", False) and g.flush() == "EN"
    assert StopFilter(()).push("anything") == ("anything", False)


def test_compression_probes_ride_in_the_step_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVzip's re-read of each chunk and a question-aware probe are works of the step: no forward outside it."""
    import longkv.engine.engine as engine_mod

    engine = _engine(max_step_tokens=64)
    forwards: list[int] = []
    batches: list[list[tuple[bool, bool, int]]] = []  # per step: (keep, decode, tokens) of each work
    real_forward, real_batch = MODEL.forward, engine_mod.run_batch

    def counting(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        forwards.append(ids.shape[0])
        return real_forward(ids, *args, **kwargs)

    def recording(model, works, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append([(w.keep, w.decode, len(w.ids)) for w in works])
        return real_batch(model, works, *args, **kwargs)

    monkeypatch.setattr(MODEL, "forward", counting)
    monkeypatch.setattr(engine_mod, "run_batch", recording)
    dense = engine.add_request(Request(_ids(10, seed=30), SamplingParams(max_new_tokens=12, ignore_eos=True), _policy("dense")))
    engine.step()  # the dense request decodes from here on
    kv = engine.add_request(Request(_ids(50, seed=31), SamplingParams(max_new_tokens=3, ignore_eos=True), _policy("kvzip:budget=40")))
    aware = engine.add_request(
        Request(_ids(40, seed=32), SamplingParams(max_new_tokens=3, ignore_eos=True), _policy("snapkv:budget=40"), question_ids=[5, 6, 7])
    )
    outs = _drain(engine)
    assert len(forwards) == engine.steps == len(batches)  # every forward is one step's batch
    probes = [(n, b) for b in batches for keep, _, n in b if not keep]
    assert sorted(n for n, _ in probes) == sorted([16, 16, 16, 2, 3, 3, 3])  # kvzip: each chunk again; snapkv: the question per chunk
    assert any(any(d for _, d, _ in b) for _, b in probes)  # a probe beside the dense request's decode token
    for rid in (dense, kv, aware):
        assert outs[rid][0].finish_reason == "length"
    alone = _engine()
    rid = alone.add_request(Request(_ids(50, seed=31), SamplingParams(max_new_tokens=3, ignore_eos=True), _policy("kvzip:budget=40")))
    assert _drain(alone)[rid][0].token_ids == outs[kv][0].token_ids


def _reservation(spec: str, n_tokens: int) -> int:
    """Bytes a sequence of ``n_tokens`` reserves under ``spec`` (what admission measures)."""
    seq = Runner(MODEL, _policy(spec), ENGINE).new_sequence(n_tokens)
    try:
        return seq.cache.bytes()
    finally:
        seq.cache.clear()


@pytest.mark.parametrize("spec", [*POLICIES, "dense:kv_quant=int8", "snapkv:budget=40,kv_quant=int4"])
@pytest.mark.parametrize("n_tokens", [1, 8, 9, 100, 400])
def test_a_reservation_is_known_before_any_page_is_taken(spec: str, n_tokens: int) -> None:
    """What a server checks a request against its KV budget with, before it queues: equal to what admission measures."""
    assert Runner(MODEL, _policy(spec), ENGINE).reservation(n_tokens) == _reservation(spec, n_tokens) > 0


def test_a_tiered_store_has_no_reservation_in_pages(tmp_path: Path) -> None:
    spec = f"block_topk:sinks=8,window=32,query_tokens=8,topk=2,dense_below=0,resident=1MiB,tier_dir={tmp_path}"
    assert Runner(MODEL, _policy(spec), ENGINE).reservation(400) is None


def test_kv_budget_admits_a_request_once_its_pages_fit() -> None:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    need = _reservation("dense", 100 + 6)
    assert need > 0 and _reservation("snapkv:budget=40", 400 + 6) < need < _reservation("dense", 400 + 6)
    engine = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, kv_budget_bytes=need + need // 2)  # one dense request at a time
    a = engine.add_request(Request(_ids(100, seed=40), params, _policy("dense")))
    b = engine.add_request(Request(_ids(100, seed=41), params, _policy("dense")))
    c = engine.add_request(Request(_ids(400, seed=42), params, _policy("snapkv:budget=40")))  # its budget + a chunk: fits beside
    running: list[tuple[str, ...]] = []
    outs: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
        running.append(tuple(o.req.request_id for o in engine.running))
        assert engine.reserved_bytes() <= engine.kv_budget_bytes
    assert not any(a in r and b in r for r in running)  # a and b never held pages together
    assert any(b in r for r in running) and running.index(next(r for r in running if b in r)) > max(i for i, r in enumerate(running) if a in r)
    assert [outs[r].finish_reason for r in (a, b, c)] == ["length"] * 3 and engine.kv_bytes() == 0
    for rid, seed in ((a, 40), (b, 41)):
        alone = _engine()
        ref = alone.add_request(Request(_ids(100, seed=seed), params, _policy("dense")))
        assert _drain(alone)[ref][0].token_ids == outs[rid].token_ids


def test_a_request_larger_than_the_kv_budget_ends_with_the_numbers() -> None:
    need = _reservation("dense", 300 + 8)
    engine = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, kv_budget_bytes=need - 1)
    rid = engine.add_request(Request(_ids(300, seed=43), SamplingParams(max_new_tokens=8), _policy("dense")))
    small = engine.add_request(Request(_ids(20, seed=44), SamplingParams(max_new_tokens=2, ignore_eos=True), _policy("dense")))
    outs = {rid_: out for rid_, (out, _) in _drain(engine).items()}
    assert outs[rid].finish_reason == "error" and "more than the engine's KV budget" in str(outs[rid].error)
    assert "300 prompt tokens + 8 new" in str(outs[rid].error)
    assert outs[small].finish_reason == "length" and engine.kv_bytes() == 0  # the next one is served
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        Engine(MODEL, _Tok(), frozenset({0}), ENGINE, kv_budget_bytes=-1)


def test_a_request_larger_than_the_kv_budget_is_refused_while_another_runs() -> None:
    """It would never fit, so it ends at once with its numbers, instead of waiting at the head of the queue for
    room that never comes (and blocking every request behind it); ``on_admit`` marks who left the queue when,
    and prefill time starts there, not at arrival."""
    small = _reservation("dense", 20 + 30)
    big = _reservation("dense", 300 + 8)
    engine = Engine(MODEL, _Tok(), frozenset({0}), ENGINE, kv_budget_bytes=big - 1)
    assert small + big - 1 > big - 1 >= small
    admitted: list[str] = []

    def req(n: int, seed: int, new: int) -> Request:
        r = Request(_ids(n, seed=seed), SamplingParams(max_new_tokens=new, ignore_eos=True), _policy("dense"))
        r.on_admit = lambda: admitted.append(r.request_id)
        return r

    first = engine.add_request(req(20, 45, 30))
    engine.step()  # first runs
    assert admitted == [first]
    too_big = engine.add_request(req(300, 46, 8))
    after = engine.add_request(req(20, 47, 2))
    outs: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for ev in engine.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
        if steps == 1:  # refused at its first admission, while first still runs
            assert too_big in outs and first not in outs and after in admitted
    assert outs[too_big].finish_reason == "error" and "300 prompt tokens + 8 new" in str(outs[too_big].error)
    assert admitted == [first, after]  # the refused one never ran
    assert outs[first].finish_reason == outs[after].finish_reason == "length"
    out = outs[after]
    assert out.arrival <= out.admitted <= out.prefill_end <= out.first_token
    assert out.queue_s == out.admitted - out.arrival and out.prefill_s == out.prefill_end - out.admitted


def test_bfloat16_batches_of_prompt_chunks_and_decode_rows_run_to_the_end() -> None:
    """In bfloat16 a step's rows are slices of one forward (not contiguous): every kernel keeps the dtype, so a
    prompt chunk sharing a step with decode rows ends as it would alone, not with an error."""
    engine_cfg = EngineConfig(chunk_size=16, page_size=8, dtype="bfloat16")
    model = build(CFG, {k: v.to(torch.bfloat16) for k, v in _weights().items()})
    engine = Engine(model, _Tok(), frozenset({0}), engine_cfg, max_num_seqs=3)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for i, n in enumerate((20, 33, 90)):  # the 90-token prompt is still prefilling while the others decode
        engine.add_request(Request(_ids(n, seed=i), params, make_policy("dense").resolve(CFG, engine_cfg)))
    outs = _drain(engine)
    assert sorted((o.finish_reason, len(o.token_ids)) for o, _ in outs.values()) == [("length", 5)] * 3, [
        repr(o.error) for o, _ in outs.values()
    ]
