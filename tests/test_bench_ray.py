"""A tiny sweep on local Ray: every (policy, length, sample-chunk) cell is a Ray task; rows stream into one JSONL."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from longkv.bench.runner import Job, RunFolder, chunks, pending_jobs, run_jobs
from longkv.bench.tasks import Sample

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def test_chunks_never_mix_cells() -> None:
    samples = [Sample(f"t/L{L}/s{i}", "niah", L, "p", ["1"]) for L in (100, 200) for i in range(3)]
    jobs = [Job(p, s) for p in ("dense", "streaming") for s in samples]
    parts = chunks(jobs, 2)
    assert sorted(len(c) for c in parts) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(len({(j.policy, j.sample.length) for j in c}) == 1 for c in parts)
    assert sorted(j.key for c in parts for j in c) == sorted(j.key for j in jobs)


@pytest.mark.slow  # starts Ray and loads the model in its workers: ~1 minute on 2 cores
@pytest.mark.skipif(not (SHARED / "models" / "get-model").exists(), reason="../shared (models, books) is absent")
def test_tiny_sweep_on_local_ray(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from longkv.bench.backends import load_tokenizer
    from longkv.bench.niah import NiahTask
    from longkv.bench.tasks import PromptFormat, load_haystack

    model = subprocess.run([str(SHARED / "models" / "get-model"), "smollm2-135m"], capture_output=True, text=True, check=True).stdout.strip()
    folder = RunFolder(tmp_path, "ray")
    folder.open({"kind": "niah", "model": model, "seed": 0})
    samples = NiahTask(load_haystack(None), max_new_tokens=8).samples(PromptFormat(load_tokenizer(model)), [400], [0.0, 1.0], 1, 0)
    jobs = pending_jobs(folder, ["dense", "streaming:budget=128"], lambda: samples)
    settings = {"name": "longkv", "model": model, "dtype": None, "chunk_size": 128, "threads": 1}
    try:
        assert run_jobs(folder, jobs, settings, ray_address="local", chunk_size=2, quiet=True) == 4
    finally:
        ray.shutdown()
    rows = folder.rows()
    assert sorted(r["key"] for r in rows) == sorted(j.key for j in jobs)
    assert all(r["status"] == "ok" and r["prompt_tokens"] == 400 and r["score"] in (0.0, 1.0) for r in rows)
    assert all(int(r["worker"].rsplit(":", 1)[1]) != os.getpid() for r in rows)  # answered by Ray workers
    assert {r["peak_kv_bytes"] > 0 for r in rows} == {True}
    assert pending_jobs(folder, ["dense", "streaming:budget=128"], lambda: samples) == []
