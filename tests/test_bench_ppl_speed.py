"""Perplexity (streaming evaluation), speed rows, report merging and the CLI around them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longkv.bench.report import merge, write_summary
from longkv.bench.runner import RunFolder
from longkv.errors import LongKVError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "models" / "get-model").exists(), reason="../shared (models, books) is absent")


def model_path(name: str) -> str:
    return subprocess.run([str(SHARED / "models" / "get-model"), name], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def llm32():  # type: ignore[no-untyped-def]
    from longkv import LLM

    return LLM(model_path("smollm2-135m"), dtype="float32", chunk_size=64, threads=1)


@needs_shared
def test_streaming_nll_matches_one_pass_logits(llm32) -> None:  # type: ignore[no-untyped-def]
    from longkv.bench.ppl import streaming_nll, text_window
    from longkv.bench.tasks import load_haystack
    from longkv.engine.runner import Runner
    from longkv.policies import make_policy

    ids = text_window(load_haystack(None), llm32, 160, 24, seed=0, index=0)
    assert len(ids) == 184
    dense = streaming_nll(llm32, ids, 160, "dense")
    # reference: all logits in one forward; NLL of tokens 160.. from positions 159..
    runner = Runner(llm32.model, make_policy("dense"), llm32.engine_config)
    logits = runner.logits_all(runner.new_sequence(len(ids)), ids).float()
    ref = -torch.log_softmax(logits[159:-1], dim=-1).gather(1, torch.tensor(ids[160:])[:, None]).mean().item()
    assert dense.eval_tokens == 24
    assert dense.nll == pytest.approx(ref, abs=2e-3)
    assert dense.ppl == pytest.approx(math.exp(ref), rel=3e-3)
    # a budget above the input keeps everything: same numbers; a tiny one loses context: different, still finite
    assert streaming_nll(llm32, ids, 160, "streaming:budget=500").nll == pytest.approx(dense.nll, abs=1e-4)
    small = streaming_nll(llm32, ids, 160, "streaming:budget=32,sinks=4")
    assert math.isfinite(small.nll) and abs(small.nll - dense.nll) > 1e-3
    assert small.peak_kv_bytes < dense.peak_kv_bytes
    with pytest.raises(LongKVError, match="trained window"):
        streaming_nll(llm32, list(range(8300)), 8200, "dense")


def _rows(tmp: Path, name: str, rows: list[dict], kind: str) -> Path:
    f = RunFolder(tmp, name)
    f.open({"kind": kind, "model": "m", "seed": 0})
    for r in rows:
        f.append(r)
    return f.path


def test_merge_tables_and_plots(tmp_path: Path) -> None:
    a = _rows(tmp_path, "a", [
        {"key": f"dense|s{i}", "task": "niah", "length": L, "depth": 0.5, "policy": "dense", "status": "ok", "score": s, "keep_ratio": 1.0,
         "prefill_tok_s": 100.0, "peak_kv_bytes": 2**20}
        for i, (L, s) in enumerate([(1000, 1.0), (1000, 0.0), (2000, 1.0)])
    ], "niah")  # fmt: skip
    b = _rows(tmp_path, "b", [
        {"key": "streaming|s0", "task": "niah", "length": 2000, "depth": 0.5, "policy": "streaming:budget=500", "status": "ok", "score": 0.0,
         "keep_ratio": 0.25, "prefill_tok_s": 120.0, "peak_kv_bytes": 2**19},
        {"key": "dense|s9", "task": "niah", "length": 9000, "depth": 0.5, "policy": "dense", "status": "refused", "score": None, "keep_ratio": 1.0},
    ], "niah")  # fmt: skip
    text = merge([a, b], tmp_path / "out").read_text()
    assert "| a | `m` | longkv, question-agnostic | 0 | 3 |  |" in text  # the runs, each with its settings
    assert "| b | `m` | longkv, question-agnostic | 0 | 2 |  |" in text
    assert "| dense (a) | 0.50 (2) | 1.00 (1) | - |" in text
    assert "| dense (b) | - | - | refused |" in text
    assert "| streaming:budget=500 (b) | - | 0.00 (1) | - |" in text
    assert "| dense (a) | 1.0 | 1.0 | - |" in text  # peak KV MiB
    for png in ("accuracy_vs_length.png", "accuracy_vs_keep_ratio.png", "heatmap_dense__a_.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    s = _rows(tmp_path, "s", [{"key": "x", "task": "speed", "length": 1000, "policy": "dense", "backend": "llama.cpp", "status": "ok",
                               "prefill_tok_s": 50.0, "decode_tok_s": 9.5, "ttft_s": 2.0, "peak_kv_bytes": 2**21}], "speed")  # fmt: skip
    with pytest.raises(LongKVError, match="different kinds"):
        merge([a, s], tmp_path / "out2")
    speed_text = merge([s], tmp_path / "out3").read_text()
    assert "| dense (llama.cpp) | 9.5 |" in speed_text and (tmp_path / "out3" / "speed_vs_length.png").exists()
    assert "| s | `m` | longkv | 0 | 1 |  |" in speed_text  # no question mode where a run asks none


def test_summaries_say_where_block_topk_read_the_prompt_densely(tmp_path: Path) -> None:
    """A prompt within block_topk's span is read densely: the summary and a merged report say which cells those are."""
    def row(i: int, length: int, dense: bool, status: str = "ok") -> dict:
        resolved = "block_topk(topk=1, ...)" + (", prompt read densely" if dense else "")
        return {"key": f"b|s{i}", "task": "niah", "length": length, "depth": 0.5, "policy": "block_topk", "status": status,
                "score": 1.0, "keep_ratio": 1.0, "policy_resolved": resolved}  # fmt: skip

    rows = [row(0, 1000, True), row(1, 1000, True), row(2, 2000, True), row(3, 16000, False), row(4, 16000, False)]
    folder = RunFolder(tmp_path, "bt")
    folder.open({"kind": "niah", "model": "m", "seed": 0, "command": "longkv bench niah --policies 'a|b'"})
    for r in rows:
        folder.append(r)
    note = "- `block_topk` read 3 of 5 prompts densely (within its span), at 1K, 2K: those cells score dense attention"
    assert note in write_summary(folder).read_text()
    other = _rows(tmp_path, "plain", [{**row(9, 1000, False), "policy": "dense", "policy_resolved": "dense"}], "niah")
    text = merge([folder.path, other], tmp_path / "out").read_text()
    assert "- `block_topk (bt)` read 3 of 5 prompts densely (within its span), at 1K, 2K" in text
    assert "`dense (plain)` read" not in text
    assert "| bt | `m` | longkv, question-agnostic | 0 | 5 | `longkv bench niah --policies 'a\\|b'` |" in text  # a | kept in its cell


def test_merge_refuses_what_would_mix_or_overwrite_runs(tmp_path: Path) -> None:
    """A run given twice, a missing folder, a merged report passed as a run, --out on a run: one-line errors, nothing
    written; two runs that share a folder name are labelled by their paths, never pooled."""
    rec = {"key": "d|s0", "task": "niah", "length": 1000, "depth": 0.5, "policy": "dense", "status": "ok", "score": 1.0, "keep_ratio": 1.0}
    a = _rows(tmp_path / "runs", "a", [rec], "niah")
    twin = _rows(tmp_path / "runs2", "a", [{**rec, "score": 0.0}], "niah")
    with pytest.raises(LongKVError, match="is given twice .* pass each run once"):
        merge([a, tmp_path / "runs" / ".." / "runs" / "a"], tmp_path / "out")
    with pytest.raises(LongKVError, match="nope does not exist: pass run folders"):
        merge([a, tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(LongKVError, match="--out .* is a run folder: .* pass a new folder"):
        merge([a, twin], twin)
    assert not (tmp_path / "out").exists() and not (twin / "summary.md").exists()
    text = merge([a, twin], tmp_path / "out").read_text()
    assert f"| dense ({a}) | 1.00 (1) |" in text and f"| dense ({twin}) | 0.00 (1) |" in text
    assert f"| {a} | `m` |" in text and f"| {twin} | `m` |" in text
    with pytest.raises(LongKVError, match="holds a merged report: pass the runs it merged"):
        merge([tmp_path / "out"], tmp_path / "out2")
    res = _cli(["report", str(a), str(twin), "--out", str(tmp_path / "out3")])
    assert res.returncode == 0, res.stderr
    assert f"| dense ({a}) | 1.00 (1) |" in res.stdout and "merged 2 run(s)" in res.stderr  # the report on stdout
    res = _cli(["report", str(a), str(a), "--out", str(tmp_path / "out4")])
    assert res.returncode != 0 and "given twice" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "longkv", "bench", *args], capture_output=True, text=True, env=env, cwd=root, timeout=600)


@pytest.mark.slow  # three model loads in subprocesses (ours, llama.cpp) and the CLI twice
@needs_shared
def test_ppl_and_speed_cli_small(tmp_path: Path) -> None:
    m = model_path("smollm2-135m")
    common = ["-m", m, "--threads", "1", "--runs-dir", str(tmp_path), "-q"]
    res = _cli(["ppl", *common, "--lengths", "300", "--eval-tokens", "8", "-p", "dense", "-p", "streaming:budget=64", "--name", "p"])
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["dense", "streaming:budget=64"]
    assert all(r["status"] == "ok" and 1.0 < r["ppl"] < 1000 and r["eval_tokens"] == 8 for r in rows)
    res = _cli(["speed", *common, "--lengths", "256", "--decode-tokens", "4", "--vs", "llama.cpp", "--name", "s"])
    assert res.returncode == 0, res.stderr
    rows = {r["backend"]: r for r in map(json.loads, (tmp_path / "s" / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"longkv", "llama.cpp"}
    for r in rows.values():
        assert r["prompt_tokens"] == 256 and r["generated_tokens"] == 4 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert rows["llama.cpp"]["peak_kv_bytes"] == 260 * 30 * 2 * 3 * 64 * 2  # float16 KV at 260 tokens
    bad = _cli(["speed", *common, "--vs", "vllm"])
    assert bad.returncode == 2 and "unknown competitor" in bad.stderr
