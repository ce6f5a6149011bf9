"""Needle-in-a-haystack: grids, scoring, exact prompt sizing on two tokenizers, run folders, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longkv.bench.niah import NiahTask, insert_at_depth
from longkv.bench.report import write_summary
from longkv.bench.runner import Job, RunFolder, keep_ratio, pending_jobs, run_jobs
from longkv.bench.tasks import Sample, load_haystack, parse_depths, parse_lengths, score_exact_number, score_recall
from longkv.errors import LongKVError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "models" / "get-model").exists(), reason="../shared (models, books) is absent")


def model_path(name: str) -> str:
    return subprocess.run([str(SHARED / "models" / "get-model"), name], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    from longkv.bench.backends import load_tokenizer

    return {name: load_tokenizer(model_path(name)) for name in ("smollm2-135m", "qwen2.5-coder-0.5b")}


def test_parse_lengths_and_depths() -> None:
    assert parse_lengths("1k, 2.5k,8000") == [1000, 2500, 8000]
    assert parse_depths("5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("abc", "0", "1.5k5", ""):
        with pytest.raises(LongKVError):
            parse_lengths(bad)
    for bad in ("1.5", "x", "-0.1"):
        with pytest.raises(LongKVError):
            parse_depths(bad)


def test_exact_number_scoring_near_misses() -> None:
    assert score_exact_number(" 7396067.", "7396067") == 1.0
    assert score_exact_number("The special magic number for calm-otter is 7396067, as stated.", "7396067") == 1.0
    assert score_exact_number("7,396,067", "7396067") == 1.0
    assert score_exact_number("7396068", "7396067") == 0.0  # one digit wrong
    assert score_exact_number("73960671", "7396067") == 0.0  # value inside a longer number
    assert score_exact_number("739606", "7396067") == 0.0  # a digit missing
    assert score_exact_number("", "7396067") == 0.0


def test_ruler_recall_scoring() -> None:
    assert score_recall("The values are 11, 22 and 33", ["11", "22", "33"]) == 1.0
    assert score_recall("VAR ABCDE and var fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert score_recall("nothing", ["x1"]) == 0.0
    assert score_recall("anything", []) == 0.0


def test_insert_at_depth_puts_needle_at_sentence_ends() -> None:
    ctx = "One two. Three four. Five six. Seven eight."
    assert insert_at_depth(ctx, "N.", 0.0).startswith("N. One")
    assert insert_at_depth(ctx, "N.", 1.0).endswith("eight. N.")
    mid = insert_at_depth(ctx, "N.", 0.5)
    assert "Five six. N. Seven" in mid or "Three four. N. Five" in mid


def test_haystack_errors(tmp_path: Path) -> None:
    with pytest.raises(LongKVError, match="does not exist"):
        load_haystack([tmp_path / "missing.txt"])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(LongKVError, match="under 1000"):
        load_haystack([short])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe" * 2000)
    with pytest.raises(LongKVError, match="UTF-8"):
        load_haystack([binary])


@needs_shared
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_niah_prompts_are_exactly_sized_and_deterministic(tokenizers: dict[str, object], name: str) -> None:
    from longkv.bench.tasks import PromptFormat

    fmt = PromptFormat(tokenizers[name])
    task = NiahTask(load_haystack(None))
    for length in (700, 3000):
        for depth in (0.0, 0.5, 1.0):
            s = task.make(fmt, length, depth, 0, seed=7)
            n = fmt.count(s.prompt)
            assert s.tokens == n
            assert length - 3 <= n <= length, (length, n)
            assert s.meta["needle"] in s.prompt and s.references[0] in s.meta["needle"]
            assert s.prompt.endswith(f"The special magic number for {s.meta['key']} mentioned in the text is")
    a, b, c = task.make(fmt, 1000, 0.5, 1, seed=3), task.make(fmt, 1000, 0.5, 1, seed=3), task.make(fmt, 1000, 0.5, 1, seed=4)
    assert a == b
    assert a.references != c.references or a.prompt != c.prompt
    # the needle sits near the requested depth (in characters of the context)
    deep = task.make(fmt, 3000, 0.75, 0, seed=1)
    body = deep.prompt.split("afterwards.\n\n", 1)[1]
    assert 0.6 < body.index(deep.meta["needle"]) / len(body) < 0.85
    with pytest.raises(LongKVError, match="length 50 is too short for niah"):
        task.make(fmt, 50, 0.5, 0, seed=0)


class CountingBackend:
    """Answers with the expected value on even calls, a wrong number on odd ones; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompt: str, policy: str, max_new_tokens: int, question: str = "") -> dict[str, object]:
        self.calls += 1
        if policy == "dense" and "L9000" in prompt:
            raise LongKVError("input exceeds the model's trained window")
        value = prompt.split(":")[-1].strip()
        return {"answer": value if self.calls % 2 == 0 else "1234567", "prompt_tokens": 10, "prefill_tok_s": 5.0, "peak_kv_bytes": 100}


def _samples(lengths: list[int]) -> list[Sample]:
    return [Sample(f"niah/L{L}/d0.50/s{i}", "niah", L, f"L{L} value:{7000000 + i}", [str(7000000 + i)], 0.5, L) for L in lengths for i in range(2)]


def test_run_folder_resume_and_refused_rows(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, "r")
    folder.open({"kind": "niah", "model": "m", "seed": 0})
    be = CountingBackend()
    settings = {"name": "longkv"}
    jobs = pending_jobs(folder, ["dense"], lambda: _samples([1000]))
    assert run_jobs(folder, jobs, settings, be, quiet=True) == 2
    assert be.calls == 2
    # rerun: nothing left for dense; adding a policy and a length runs only the new cells
    assert pending_jobs(folder, ["dense"], lambda: _samples([1000])) == []
    jobs = pending_jobs(folder, ["dense", "streaming:budget=512"], lambda: _samples([1000, 9000]))
    assert sorted(j.key for j in jobs) == sorted(
        ["dense|niah/L9000/d0.50/s0", "dense|niah/L9000/d0.50/s1"] + [f"streaming:budget=512|niah/L{L}/d0.50/s{i}" for L in (1000, 9000) for i in (0, 1)]
    )
    run_jobs(folder, jobs, settings, be, quiet=True)
    rows = folder.rows()
    assert len(rows) == 8 and len(folder.done_keys()) == 8
    refused = [r for r in rows if r["status"] == "refused"]
    assert {r["key"] for r in refused} == {"dense|niah/L9000/d0.50/s0", "dense|niah/L9000/d0.50/s1"}
    assert all(r["score"] is None and "window" in r["error"] for r in refused)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["correct"] for r in ok] == [r["score"] == 1.0 for r in ok]
    assert {r["keep_ratio"] for r in ok if r["policy"].startswith("streaming") and r["length"] == 9000} == {round(512 / 9000, 4)}
    # a torn last line (killed run) is ignored
    with folder.results_file.open("a") as f:
        f.write('{"key": "dense|torn')
    assert len(folder.rows()) == 8
    summary = write_summary(folder).read_text()
    assert "| dense | 0.50 (2) | refused |" in summary
    assert (folder.path / "heatmap_dense.png").stat().st_size > 1000


def test_a_run_folder_extended_by_later_commands_records_them_all(tmp_path: Path) -> None:
    """config.json and the summary keep what every command that added rows asked for, not only the last one."""
    first = {"kind": "niah", "model": "m", "seed": 0, "policies": ["dense", "streaming:budget=512"], "lengths": [2000],
             "samples": 2, "command": "longkv bench niah -p dense -p streaming:budget=512 --samples 2"}  # fmt: skip
    folder = RunFolder(tmp_path, "n1")
    folder.open(first)
    run_jobs(folder, pending_jobs(folder, ["dense"], lambda: _samples([1000])), {"name": "longkv"}, CountingBackend(), quiet=True)
    folder.open({**first, "policies": ["dense", "snapkv:budget=512"], "lengths": [2000, 4000], "samples": 1,
                 "command": "longkv bench niah -p dense -p snapkv:budget=512 --lengths 2k,4k --samples 1"})  # fmt: skip
    folder.open({**first, "policies": ["dense"], "command": first["command"]})  # the first command again
    cfg = folder.config()
    assert cfg["policies"] == ["dense", "streaming:budget=512", "snapkv:budget=512"] and cfg["lengths"] == [2000, 4000]
    assert cfg["samples"] == 2
    assert cfg["commands"] == [first["command"], "longkv bench niah -p dense -p snapkv:budget=512 --lengths 2k,4k --samples 1"]
    summary = write_summary(folder).read_text()
    assert "```\n" + "\n".join(cfg["commands"]) + "\n```" in summary


def test_summary_names_the_default_model_when_none_was_given(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, "r")
    folder.open({"kind": "niah", "model": None, "seed": 0})
    assert "model: `SmolLM2-135M-Instruct (default)`" in write_summary(folder).read_text()
    named = RunFolder(tmp_path, "s")
    named.open({"kind": "niah", "model": "./qwen.gguf", "seed": 0})
    assert "model: `./qwen.gguf`, backend: longkv, question-agnostic, seed 0" in write_summary(named).read_text()
    aware = RunFolder(tmp_path, "q")
    aware.open({"kind": "ruler", "model": "m", "seed": 0, "question_aware": True})
    assert "backend: longkv, question-aware, seed 0" in write_summary(aware).read_text()


def test_run_folder_rejects_changed_fixed_settings(tmp_path: Path) -> None:
    def opened(config: dict[str, object]) -> RunFolder:
        folder = RunFolder(tmp_path, "r")
        folder.open(config)
        return folder

    # a run that failed before its first answer (a bad model path) leaves only its config: the next run takes its place
    opened({"kind": "niah", "model": "/nonexistent.gguf", "seed": 0})
    opened({"kind": "niah", "model": "a", "seed": 0}).append({"key": "dense|x"})
    opened({"kind": "niah", "model": "a", "seed": 0, "lengths": [5]})  # grid may grow
    with pytest.raises(LongKVError, match="seed=0, not seed=1: pass the same options to resume it, or another --name"):
        opened({"kind": "niah", "model": "a", "seed": 1})
    with pytest.raises(LongKVError, match="model='a', not the default model"):
        opened({"kind": "niah", "model": None, "seed": 0})
    opened({"kind": "niah", "model": "a", "seed": 0, "weights": "auto"})  # a folder from before the key
    with pytest.raises(LongKVError, match="weights='auto', not weights='int8'"):
        opened({"kind": "niah", "model": "a", "seed": 0, "weights": "int8"})
    opened({"kind": "niah", "model": "a", "seed": 0, "question_aware": False})  # the default before the key
    with pytest.raises(LongKVError, match="made with --question-agnostic, not --question-aware"):
        opened({"kind": "niah", "model": "a", "seed": 0, "question_aware": True})
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"] == "a"  # a refused run writes nothing
    with pytest.raises(LongKVError, match="bad run name"):
        RunFolder(tmp_path, "../x")


def test_keep_ratio() -> None:
    assert keep_ratio("dense", 4000) == 1.0
    assert keep_ratio("streaming:budget=1000", 4000) == 0.25
    assert keep_ratio("streaming:budget=8000", 4000) == 1.0
    assert Job("dense", _samples([1])[0]).key == "dense|niah/L1/d0.50/s0"


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "longkv", "bench", *args], capture_output=True, text=True, env=env, cwd=root, timeout=600)


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    hay = tmp_path / "h.txt"
    hay.write_text("Some words here. " * 200)
    for args, msg in (
        (["niah", "--lengths", "abc", "--haystack", str(hay)], "bad length"),
        (["niah", "--policy", "nosuch", "--haystack", str(hay), "--runs-dir", str(tmp_path)], "unknown policy"),
        (["niah", "--backend", "transformers", "-p", "streaming", "--haystack", str(hay)], "dense attention only"),
        (["niah", "--weights", "int2", "--haystack", str(hay), "--runs-dir", str(tmp_path)], "unknown weights 'int2'"),
        (["niah", "--backend", "transformers", "--weights", "int8", "--haystack", str(hay), "--runs-dir", str(tmp_path)], "--weights is longkv's"),
        (["ruler", "--backend", "transformers", "--question-aware", "--runs-dir", str(tmp_path)], "--question-aware is longkv's"),
        (["ruler", "--tasks", " ", "--runs-dir", str(tmp_path)], "--tasks is empty"),
        (["ruler", "-p", "snapvk:budget=256", "--runs-dir", str(tmp_path)], "unknown policy 'snapvk': did you mean snapkv?"),
        (["ppl", "--weights", "int2", "--runs-dir", str(tmp_path)], "unknown weights 'int2'"),
        (["report", str(tmp_path)], "not a run folder"),
    ):
        res = _cli(args)
        assert res.returncode == 2, res.stderr
        assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@needs_shared
def test_niah_end_to_end_smollm2_writes_all_outputs_and_resumes(tmp_path: Path) -> None:
    args = ["niah", "-m", model_path("smollm2-135m"), "--lengths", "1k", "--depths", "0.5", "--samples", "1", "--threads", "1",
            "--max-new-tokens", "10", "--runs-dir", str(tmp_path), "--name", "e2e", "--weights", "int8", "-q"]  # fmt: skip
    res = _cli(args)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "e2e"
    assert {p.name for p in run.iterdir()} >= {"config.json", "results.jsonl", "summary.md", "heatmap_dense.png", "accuracy_vs_length.png"}
    (row,) = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert row["tokens"] == 1000 and row["prompt_tokens"] == 1000 and row["status"] == "ok"
    assert row["score"] == (1.0 if row["expected"][0] in row["answer"] else 0.0)
    assert row["peak_kv_bytes"] > 0 and row["prefill_s"] > 0 and row["weights"] == "int8"
    config = json.loads((run / "config.json").read_text())
    assert config["lengths"] == [1000] and config["weights"] == "int8"
    assert "| dense |" in (run / "summary.md").read_text()
    again = _cli(args)
    assert again.returncode == 0 and "0 new rows" in again.stderr
    assert len((run / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow  # loads the model twice (ours and transformers)
@needs_shared
def test_transformers_backend_gives_the_reference_answer() -> None:
    from longkv.bench.backends import make_backend
    from longkv.bench.tasks import PromptFormat

    m = model_path("smollm2-135m")
    ref = make_backend("transformers", m, threads=1)
    ours = make_backend("longkv", m, dtype="float32", threads=1)
    s = NiahTask(load_haystack(None), max_new_tokens=10).make(PromptFormat(ref.tokenizer), 400, 0.5, 0, seed=2)
    a = ref.generate(s.prompt, "dense", s.max_new_tokens)
    b = ours.generate(s.prompt, "dense", s.max_new_tokens)
    assert a["prompt_tokens"] == b["prompt_tokens"] == 400
    assert a["answer"] == b["answer"]  # float32 dense greedy: same tokens
    with pytest.raises(LongKVError, match="dense attention only"):
        ref.generate(s.prompt, "streaming:budget=64", 4)


def test_progress_counts_cells_and_running_accuracy() -> None:
    from longkv.bench.runner import Progress

    cell = ("longkv", "dense", "niah", 1000, 0.5)
    p = Progress(3, "x", quiet=True, cells={cell: 2, ("longkv", "dense", "niah", 2000, 0.5): 1})
    row = {"backend": "longkv", "policy": "dense", "task": "niah", "length": 1000, "depth": 0.5, "score": 1.0}
    p.update(row)
    assert p._cells_text() == "cells 0/2"
    p.update({**row, "score": 0.0})
    assert p._cells_text() == "cells 1/2" and p.scores == [1.0, 0.0]


def test_keep_ratio_plot_has_one_point_per_cell() -> None:
    """Two tasks of one cell fitted to 2000 and 1998 tokens keep 0.128 and 0.1281 of them: one point, their mean score."""
    from longkv.bench.plots import _series, by_cell_keep_ratio

    rows = [
        {"policy": "snapkv:budget=256", "length": 2000, "keep_ratio": 0.128, "score": 1.0},
        {"policy": "snapkv:budget=256", "length": 2000, "keep_ratio": 0.1281, "score": 0.0},
        {"policy": "snapkv:budget=256", "length": 4000, "keep_ratio": 0.064, "score": 1.0},
    ]
    assert _series(rows, "keep_ratio", "score")["snapkv:budget=256"] == [(0.064, 1.0), (0.128, 1.0), (0.1281, 0.0)]
    assert _series(by_cell_keep_ratio(rows), "cell_keep_ratio", "score")["snapkv:budget=256"] == [(0.064, 1.0), (0.12805, 0.5)]
