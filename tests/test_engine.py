"""The LLM class: generation, stop conditions, stats, streaming text."""

from __future__ import annotations

from pathlib import Path

import pytest

from longkv import LLM, LongKVError


@pytest.fixture(scope="module")
def tiny(tiny_qwen2: Path) -> LLM:
    return LLM(model=tiny_qwen2, dtype="float32", chunk_size=128)


def test_greedy_is_deterministic_and_counts_tokens(tiny: LLM) -> None:
    a = tiny.generate("The quick brown fox", max_new_tokens=20, ignore_eos=True)
    b = tiny.generate("The quick brown fox", max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    assert a.finish_reason == "length"
    assert a.text == tiny.tokenizer.decode(a.token_ids, skip_special_tokens=True).removesuffix("\ufffd")  # random weights: bytes cut mid-character
    st = a.stats
    assert st.prompt_tokens == len(tiny.encode("The quick brown fox"))
    assert st.generated_tokens == 20 and st.prefill_s > 0 and st.decode_s > 0 and st.ttft_s >= st.prefill_s
    assert st.peak_kv_bytes > 0 and st.policy == "dense"


def test_seeded_sampling_reproduces(tiny: LLM) -> None:
    a = tiny.generate("Alice was", max_new_tokens=15, temperature=1.0, seed=3, ignore_eos=True)
    b = tiny.generate("Alice was", max_new_tokens=15, temperature=1.0, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_stop_string_cuts_the_text(tiny: LLM) -> None:
    full = tiny.generate("The quick", max_new_tokens=30, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = tiny.generate("The quick", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_streamed_pieces_join_to_the_text(tiny: LLM) -> None:
    pieces: list[str] = []
    out = tiny.generate("def main", max_new_tokens=25, ignore_eos=True, on_text=pieces.append)
    assert "".join(pieces) == out.text and len(pieces) > 1


def test_eos_stops_generation(smollm2_bf16: LLM) -> None:
    out = smollm2_bf16.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=200)
    assert out.finish_reason == "stop" and 0 < len(out.token_ids) < 200


def test_bad_inputs_raise_clear_errors(tiny: LLM) -> None:
    with pytest.raises(LongKVError, match="prompt is empty"):
        tiny.generate("", max_new_tokens=4)
    with pytest.raises(LongKVError, match="no messages"):
        tiny.chat([])
    with pytest.raises(LongKVError, match=r"messages must be a list of .* got str: e.g. chat\(\[\{'role': 'user'"):
        tiny.chat("hello")  # type: ignore[arg-type]
    with pytest.raises(LongKVError, match="the text is not valid UTF-8 \\(it holds '\\\\udce9'"):
        tiny.ask("caf\udce9 au lait", "What is it?")  # a str decoded with surrogateescape
    with pytest.raises(LongKVError, match="the prompt must be text .* or a list of token ids, got int"):
        tiny.generate(123, max_new_tokens=4)  # type: ignore[arg-type]
    with pytest.raises(LongKVError, match="exceeds the model's trained window of 512"):
        tiny.generate([1] * 500, max_new_tokens=20, policy="dense")


def test_auto_policy_switches_to_streaming_beyond_the_window(tiny: LLM) -> None:
    assert tiny.resolve_policy(100).name == "dense"
    pol = tiny.resolve_policy(5000)
    assert pol.name == "streaming" and pol.budget_tokens == 512 - 128  # budget + chunk fits the window


@pytest.mark.parametrize("policy", ["dense", "snapkv:budget=40", "kvzip:budget=40"])
def test_batch_generation_equals_each_prompt_alone(tiny: LLM, policy: str) -> None:
    prompts = ["The quick brown fox jumps over the lazy dog. " * 6, "Alice was", "def main():\n    return 1\n" * 3]
    alone = [tiny.generate(p, max_new_tokens=12, ignore_eos=True, policy=policy) for p in prompts]
    batch = tiny.generate_batch(prompts, max_new_tokens=12, ignore_eos=True, policy=policy)
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert [g.stats.prompt_tokens for g in batch] == [len(tiny.encode(p)) for p in prompts]
    total = sum(g.stats.prompt_tokens for g in batch)  # the shared prefill time covers every prompt
    assert all(g.stats.batch_prompt_tokens == total and g.stats.prefill_tok_s == total / g.stats.prefill_s for g in batch)
    assert f"(batch of {total} tokens)" in batch[0].stats.line() and "batch of" not in alone[0].stats.line()
    assert all(g.finish_reason == "length" and g.stats.generated_tokens == 12 for g in batch)


def test_batch_generation_stops_each_sequence_on_its_own(tiny: LLM) -> None:
    full = tiny.generate("The quick", max_new_tokens=30, ignore_eos=True)
    stop = full.text[3:6]
    out = tiny.generate_batch(["The quick", "Alice was"], max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out[0].finish_reason == "stop" and out[0].text == full.text[: full.text.find(stop)]
    other = tiny.generate("Alice was", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out[1].text == other.text and out[1].finish_reason == other.finish_reason


def test_batch_generation_question_aware_equals_each_alone(tiny: LLM) -> None:
    prompts = [tiny.encode("The quick brown fox jumps over the lazy dog. " * 8), tiny.encode("def main():\n    return 1\n" * 5)]
    questions = [p[-6:] for p in prompts]
    alone = [tiny.generate(p, max_new_tokens=8, ignore_eos=True, policy="snapkv:budget=40", question_ids=q) for p, q in zip(prompts, questions, strict=True)]
    batch = tiny.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, policy="snapkv:budget=40", question_ids=questions)
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert all(g.stats.compression == "question-aware" for g in batch + alone)
    agnostic = tiny.generate(prompts[0], max_new_tokens=2, ignore_eos=True, policy="snapkv:budget=40")
    assert agnostic.stats.compression == "question-agnostic" and "question-agnostic" in agnostic.stats.line()
    assert tiny.generate(prompts[0], max_new_tokens=2, policy="kvzip:budget=40").stats.compression == "question-agnostic (re-read)"
    assert tiny.generate(prompts[0], max_new_tokens=2, policy="dense").stats.compression == ""


def test_agnostic_compression_still_names_the_question_to_block_topk(tiny: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from longkv.inputs import Document
    from longkv.policies import BlockTopKPolicy

    text = "The meeting moved to Thursday. Budget approved: 4200 euros.\n" * 14
    q = "When is the meeting?"
    ids, question_ids = tiny.ask_ids([Document("<stdin>", text)], q)
    # eviction: question_aware=False compresses as if no question were named
    kw = {"max_new_tokens": 4, "ignore_eos": True, "policy": "snapkv:budget=40"}
    agnostic = tiny.generate(ids, question_ids=question_ids, question_aware=False, **kw)
    unnamed = tiny.generate(ids, **kw)
    aware = tiny.generate(ids, question_ids=question_ids, **kw)
    assert agnostic.token_ids == unnamed.token_ids and agnostic.stats.compression == unnamed.stats.compression == "question-agnostic"
    assert aware.stats.compression == "question-aware"
    # block_topk chooses its pages from the question either way (ask --compression agnostic too)
    seen: list[int] = []
    select = BlockTopKPolicy.select

    def spy(self, state, *args):  # type: ignore[no-untyped-def]
        seen.append(state.question_tokens)
        return (yield from select(self, state, *args))

    monkeypatch.setattr(BlockTopKPolicy, "select", spy)
    spec = "block_topk:sinks=64,window=64,query_tokens=16,topk=1,margin=0,dense_fallback=false"  # span 512, the window
    assert len(ids) > 600
    tiny.ask(text, q, question_aware=False, policy=spec, max_new_tokens=2)
    tiny.generate(ids, policy=spec, max_new_tokens=2)
    assert seen == [len(question_ids), 0]


def test_batch_generation_bad_inputs(tiny: LLM) -> None:
    with pytest.raises(LongKVError, match="question_ids has 1 entries for 2 prompts"):
        tiny.generate_batch(["a b", "c d"], question_ids=[[1]])
    with pytest.raises(LongKVError, match="no prompts"):
        tiny.generate_batch([])
    with pytest.raises(LongKVError, match="prompt 1 is empty"):
        tiny.generate_batch(["hello", ""])
    with pytest.raises(LongKVError, match="prompts must be a list of prompts .* got str"):
        tiny.generate_batch("hello")  # type: ignore[arg-type]
    with pytest.raises(LongKVError, match="prompt 1 must be text .* got NoneType"):
        tiny.generate_batch(["hello", None])  # type: ignore[list-item]


def test_ask_frames_the_question_as_the_cli_does(tiny: LLM, tmp_path: Path) -> None:
    from longkv.config import ASK_DRY_MULTIPLIER
    from longkv.inputs import Document

    text = "The meeting moved to Thursday. Budget approved: 4200 euros.\n" * 6
    q = "When is the meeting?"
    out = tiny.ask(text, q, max_new_tokens=6, ignore_eos=True)
    ids, question_ids = tiny.ask_ids([Document("<stdin>", text)], q)
    assert "### Question\nWhen is the meeting?" in tiny.tokenizer.decode(ids)
    assert question_ids is not None and tiny.tokenizer.decode(question_ids).startswith(q)  # the question and the tail
    assert ids[-len(question_ids) :] == question_ids and len(question_ids) == len(tiny.encode(tiny.ask_text([Document("<stdin>", text)], q).split("### Question\n")[1]))
    assert out.stats.prompt_tokens == len(ids)
    # ask decodes with the loop guard on; dry_multiplier=0.0 turns it off
    assert out.token_ids == tiny.generate(ids, max_new_tokens=6, ignore_eos=True, dry_multiplier=ASK_DRY_MULTIPLIER).token_ids
    plain = tiny.ask(text, q, max_new_tokens=6, ignore_eos=True, dry_multiplier=0.0)
    assert plain.token_ids == tiny.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    (tmp_path / "notes.txt").write_text(text)
    by_file = tiny.ask(tmp_path / "notes.txt", q, max_new_tokens=2, ignore_eos=True)
    with pytest.raises(LongKVError, match=r"ask\(\) reads a str as the text itself, and .*notes.txt' names a file: pass Path\("):
        tiny.ask(str(tmp_path / "notes.txt"), q, max_new_tokens=1)
    file_ids, _ = tiny.ask_ids([Document(str(tmp_path / "notes.txt"), text)], q)
    assert by_file.stats.prompt_tokens == len(file_ids) > len(ids)  # the file is introduced by its path
    with pytest.raises(LongKVError, match="question is empty"):
        tiny.ask(text, "  ")
    with pytest.raises(LongKVError, match="text is empty"):
        tiny.ask("", q)
    with pytest.raises(LongKVError, match="missing.txt"):
        tiny.ask([tmp_path / "missing.txt"], q)


def test_stats_line_and_json_with_one_generated_token() -> None:
    from longkv.engine.results import Stats

    one = Stats(prompt_tokens=100, generated_tokens=1, prefill_s=0.5, ttft_s=0.5, decode_s=0.0, policy="dense")
    assert "| decode - (1 token) |" in one.line()  # no rate from a single token
    d = one.as_dict()
    assert d["compression"] is None and "batch_prompt_tokens" not in d and d["decode_tok_s"] == 0.0
    many = Stats(prompt_tokens=100, generated_tokens=11, prefill_s=0.5, ttft_s=0.5, decode_s=2.0, compression="question-aware")
    assert "| decode 5.0 tok/s (11 tokens) |" in many.line() and many.as_dict()["compression"] == "question-aware"


def test_batch_generation_under_a_kv_budget(tiny_qwen2: Path, tiny: LLM) -> None:
    prompts = ["The quick brown fox jumps over the lazy dog. " * 6, "Alice was", "def main():\n    return 1\n" * 3]
    free = tiny.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, policy="dense")
    per_token = 2 * tiny.config.n_layers * tiny.config.n_kv_heads * tiny.config.head_dim * 4 + 8 * tiny.config.n_layers
    longest = max(g.stats.prompt_tokens for g in free) + 8
    one = LLM(model=tiny_qwen2, dtype="float32", chunk_size=128, kv_budget_bytes=2 * longest * per_token)  # ~ one at a time
    bounded = one.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, policy="dense")
    assert [g.token_ids for g in bounded] == [g.token_ids for g in free]
    with pytest.raises(LongKVError, match="more than the engine's KV budget"):
        one.generate_batch([[5] * 400], max_new_tokens=8, policy="dense")
    assert one.engine.kv_bytes() == 0 and not one.engine.has_unfinished()
    with pytest.raises(LongKVError, match="kv_budget_bytes must be at least 1"):
        LLM(model=tiny_qwen2, kv_budget_bytes=0)
