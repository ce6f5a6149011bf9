"""Run folders and the sample loop: in-process, or one Ray task per (policy, length, sample chunk).

A run lives in ``runs/<name>/``: ``config.json`` (what was asked), ``results.jsonl``
(one JSON object per finished sample, appended as it finishes), ``summary.md``
and PNGs (rewritten at the end). Each row has a ``key`` (``policy|sample id``);
rerunning the same command skips every key already in ``results.jsonl``, so an
interrupted sweep resumes where it stopped, and adding lengths or policies to a
finished run only runs the new cells.

Ray is imported only when ``ray_address`` is given (``"local"``: ``ray.init()`` on
this machine; otherwise a cluster address).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longkv.bench.tasks import Sample, score_exact_number, score_recall
from longkv.errors import LongKVError
from longkv.policies import make_policy

# config.json entries a resumed run must share with the old one: they change what a sample is.
FIXED_KEYS = ("kind", "model", "seed", "backend", "dtype", "chunk_size", "haystack", "options", "weights", "question_aware")
_KEY_DEFAULTS = {"weights": "auto", "question_aware": False}  # a run folder written before the key existed ran with this


_RESUME_HINT = "pass the same options to resume it, or another --name (or delete the folder) to start a new run"


def _setting(key: str, value: Any) -> str:
    """A fixed setting as the command line gives it."""
    if key == "question_aware":
        return "--question-aware" if value else "--question-agnostic"
    if key == "model" and value is None:
        return "the default model"
    return f"{key}={value!r}"


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The config of a run folder that a later command extends: what every command asked for together (lists of
    policies, lengths, depths joined in order, the most samples) and every command, in order (``commands``)."""
    out = dict(new)
    for k, v in new.items():
        was = old.get(k)
        if isinstance(v, list) and isinstance(was, list) and k not in FIXED_KEYS:
            out[k] = was + [x for x in v if x not in was]
        elif k == "samples" and isinstance(v, int) and isinstance(was, int):
            out[k] = max(v, was)
    commands = [c for c in old.get("commands") or [old.get("command")] if c]
    out["commands"] = commands + ([new["command"]] if new.get("command") and new["command"] not in commands else [])
    return out


class RunFolder:
    """``<root>/<name>/`` with its config, results and summary.

    Raises:
        LongKVError (from :meth:`open`): the folder holds a run made with different fixed settings.
    """

    def __init__(self, root: str | Path, name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise LongKVError(f"bad run name {name!r}: use a plain folder name such as niah-smollm2")
        self.path = Path(root) / name
        self.config_file = self.path / "config.json"
        self.results_file = self.path / "results.jsonl"

    def open(self, config: dict[str, Any]) -> None:
        """Create the folder, or check that a resumed run keeps the fixed settings; then write ``config``.

        A folder without a result row (a run that failed before its first answer) takes the new settings.
        """
        if self.config_file.exists() and self.rows():
            old = json.loads(self.config_file.read_text())
            for k in FIXED_KEYS:
                was, now = old.get(k, _KEY_DEFAULTS.get(k)), config.get(k, _KEY_DEFAULTS.get(k))
                if was != now:
                    raise LongKVError(f"run folder {self.path} was made with {_setting(k, was)}, not {_setting(k, now)}: {_RESUME_HINT}")
            config = _merged(old, config)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")

    def config(self) -> dict[str, Any]:
        return json.loads(self.config_file.read_text()) if self.config_file.exists() else {}

    def rows(self) -> list[dict[str, Any]]:
        """Every finished row (a torn last line from a killed run is ignored)."""
        if not self.results_file.exists():
            return []
        out = []
        for line in self.results_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.rows() if "key" in r}

    def append(self, row: dict[str, Any]) -> None:
        with self.results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Job:
    """One (policy, sample) pair to answer."""

    policy: str
    sample: Sample

    @property
    def key(self) -> str:
        return f"{self.policy}|{self.sample.id}"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "sample": self.sample.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(d["policy"], Sample.from_dict(d["sample"]))


def keep_ratio(policy: str, prompt_tokens: int) -> float:
    """Share of the prompt's tokens the policy keeps in the KV cache (1.0 for dense or a budget above the prompt)."""
    budget = make_policy(policy).budget_tokens
    if budget is None or prompt_tokens <= 0:
        return 1.0
    return round(min(1.0, budget / prompt_tokens), 4)


def score(sample: Sample, answer: str) -> float:
    """``niah``: whole-number exact match; RULER tasks: recall of the references (``string_match_all``)."""
    if sample.task == "niah":
        return score_exact_number(answer, sample.references[0])
    return score_recall(answer, sample.references)


def evaluate(backend: Any, job: Job, backend_name: str) -> dict[str, Any]:
    """Answer one job and build its result row; a policy that refuses the input gives a ``refused`` row."""
    s = job.sample
    row: dict[str, Any] = {
        "key": job.key,
        "task": s.task,
        "sample_id": s.id,
        "length": s.length,
        "depth": s.depth,
        "policy": job.policy,
        "backend": backend_name,
        "tokens": s.tokens,
        "keep_ratio": keep_ratio(job.policy, s.tokens),
        "expected": s.references,
    }
    try:
        out = backend.generate(s.prompt, job.policy, s.max_new_tokens, s.question)
    except LongKVError as exc:
        return {**row, "status": "refused", "error": str(exc), "answer": None, "score": None, "correct": None}
    sc = score(s, out["answer"])
    return {**row, "status": "ok", **out, "score": sc, "correct": sc == 1.0}


# Ray workers keep one backend per settings, so a worker loads the model once for all its tasks.
_WORKER_BACKENDS: dict[str, Any] = {}


def run_chunk(settings: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer a list of serialised jobs with a backend built from ``settings`` (the Ray task body)."""
    from longkv.bench.backends import make_backend

    tag = json.dumps(settings, sort_keys=True)
    if tag not in _WORKER_BACKENDS:
        _WORKER_BACKENDS[tag] = make_backend(**settings)
    backend = _WORKER_BACKENDS[tag]
    worker = f"{socket.gethostname()}:{os.getpid()}"  # which machine/process answered, for cluster runs
    return [{**evaluate(backend, Job.from_dict(j), settings["name"]), "worker": worker} for j in jobs]


def chunks(jobs: list[Job], size: int) -> list[list[Job]]:
    """Split jobs into chunks of at most ``size`` that never mix a (policy, length) cell."""
    cells: dict[tuple[str, int], list[Job]] = {}
    for j in jobs:
        cells.setdefault((j.policy, j.sample.length), []).append(j)
    return [cell[i : i + size] for cell in cells.values() for i in range(0, len(cell), size)]


def _cell(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("backend"), row.get("policy"), row.get("task"), row.get("length"), row.get("depth"))


class Progress:
    """Rich progress on stderr: samples and cells done, ETA and the running accuracy; silent when ``quiet``.

    ``cells`` maps a cell (backend, policy, task, length, depth) to its pending sample count.
    """

    def __init__(self, total: int, label: str, quiet: bool, cells: dict[tuple[Any, ...], int] | None = None) -> None:
        self.bar: Any = None
        self.scores: list[float] = []
        self.cells = dict(cells or {})
        self.cells_total = len(self.cells)
        if quiet or total == 0:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[cells]}"),
            TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(label, total=total, acc="", cells=self._cells_text())
        self.bar.start()

    def _cells_text(self) -> str:
        done = sum(1 for n in self.cells.values() if n <= 0)
        return f"cells {done}/{self.cells_total}" if self.cells_total else ""

    def update(self, row: dict[str, Any]) -> None:
        if row.get("score") is not None:
            self.scores.append(float(row["score"]))
        if _cell(row) in self.cells:
            self.cells[_cell(row)] -= 1
        if self.bar is not None:
            acc = f"acc {sum(self.scores) / len(self.scores):.2f}" if self.scores else ""
            desc = f"{row.get('policy', '')} L{row.get('length', '')}"
            self.bar.update(self.task, advance=1, acc=acc, cells=self._cells_text(), description=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def pending_jobs(folder: RunFolder, policies: list[str], make_samples: Callable[[], Iterable[Sample]]) -> list[Job]:
    """Jobs not yet in ``results.jsonl``, policy-major so each policy's cells finish together."""
    done = folder.done_keys()
    samples = list(make_samples())
    return [j for p in policies for s in samples if (j := Job(p, s)).key not in done]


def run_jobs(
    folder: RunFolder,
    jobs: list[Job],
    settings: dict[str, Any],
    backend: Any = None,
    ray_address: str | None = None,
    chunk_size: int = 4,
    quiet: bool = False,
) -> int:
    """Answer every job, appending each row to ``results.jsonl`` as it finishes; return the rows written.

    In-process with ``backend`` (built from ``settings`` when ``None``), or, with
    ``ray_address``, one Ray task per chunk of at most ``chunk_size`` jobs of one
    (policy, length) cell (``"local"`` starts Ray on this machine).
    """
    cells: dict[tuple[Any, ...], int] = {}
    for j in jobs:
        key = (settings["name"], j.policy, j.sample.task, j.sample.length, j.sample.depth)
        cells[key] = cells.get(key, 0) + 1
    progress = Progress(len(jobs), "starting", quiet, cells)
    written = 0
    try:
        if ray_address is None:
            if jobs and backend is None:
                from longkv.bench.backends import make_backend

                backend = make_backend(**settings)
            for job in jobs:
                row = evaluate(backend, job, settings["name"])
                folder.append(row)
                progress.update(row)
                written += 1
        else:
            rows = _ray_rows(jobs, settings, ray_address, chunk_size)
            try:
                for row in rows:
                    folder.append(row)
                    progress.update(row)
                    written += 1
            finally:
                rows.close()  # its cleanup (tasks cancelled, a local cluster stopped) runs now, not at garbage collection
    finally:
        progress.close()
    return written


def _ray_rows(jobs: list[Job], settings: dict[str, Any], address: str, chunk_size: int) -> Generator[dict[str, Any], None, None]:
    try:
        import ray
    except ImportError:
        raise LongKVError("--ray needs Ray: pip install 'longkv[ray]'") from None
    started = False
    if not ray.is_initialized():
        # Workers must import this very longkv tree, whether installed or run from a checkout.
        root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
        ray.init(
            address=None if address == "local" else address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        started = True
    # SIGTERM (timeout, kill, a scheduler) ends the sweep as Ctrl-C does, through the cleanup below: a killed driver
    # had left its local cluster's workers running, owned by init
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)) if main else None
    task = ray.remote(num_cpus=1)(run_chunk)
    pending = [task.remote(settings, [j.to_dict() for j in c]) for c in chunks(jobs, chunk_size)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
        if main:
            signal.signal(signal.SIGTERM, before)
