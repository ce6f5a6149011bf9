"""``longkv bench ...``: the evaluation harness's commands (a Typer sub-app of the main CLI).

Every command writes one run folder ``<runs-dir>/<name>/`` (config.json,
results.jsonl, summary.md, PNGs) and resumes it when run again.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from longkv.errors import LongKVError
from longkv.helpflag import Command, Group

bench_app = typer.Typer(cls=Group, help="Long-context benchmarks: needle-in-a-haystack, RULER-style tasks, perplexity, speed.", no_args_is_help=True)
out = Console(stderr=True, highlight=False)

Model = Annotated[str | None, typer.Option("--model", "-m", help="A .gguf file, a Hugging Face folder, or a hub id (default: SmolLM2-135M-Instruct).")]
Policies = Annotated[list[str] | None, typer.Option("--policy", "-p", help="KV policy spec, repeatable: dense, block_topk, snapkv:budget=2048, streaming:budget=1024, ... "
                                                            "(every name and knob: longkv policies; default: dense).")]
Lengths = Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated (k = 1000): 2k,4k,8k.")]
Samples = Annotated[int, typer.Option(help="Samples per cell.")]
Seed = Annotated[int, typer.Option(help="Seed of the sample generators.")]
Name = Annotated[str | None, typer.Option(help="Run folder name under --runs-dir (default: the benchmark's name, e.g. niah; a run of another model or other fixed settings needs a --name of its own).")]
RunsDir = Annotated[Path, typer.Option(help="Where run folders live.")]
Ray = Annotated[str | None, typer.Option("--ray", help="Run cells as Ray tasks: 'local' (ray.init() here) or a cluster address.")]
Backend = Annotated[str, typer.Option(help="longkv (our engine) or transformers (dense reference, eager attention).")]
Dtype = Annotated[str | None, typer.Option(help="bfloat16 or float32 (default: bfloat16 for longkv, float32 for transformers).")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")]
Device = Annotated[str, typer.Option(help="Where longkv runs: cpu, cuda or cuda:N.")]
ChunkSize = Annotated[int, typer.Option(help="Prefill chunk in tokens.")]
Weights = Annotated[str, typer.Option(help="Weights longkv's decode steps read: auto, int4, int8, mixed or none (see longkv ask --help).")]
QuestionAware = Annotated[
    bool,
    typer.Option(
        "--question-aware/--question-agnostic",
        metavar="",
        help="Name each sample's question to the engine as `longkv ask` does: eviction compresses for it, "
        "block_topk chooses pages from its queries (longkv backend). Default: question-agnostic (the prompt is one text; "
        "longkv ask is question-aware), where SnapKV-style eviction at a small budget can do no better than streaming.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar.")]
Haystack = Annotated[list[Path] | None, typer.Option("--haystack", help="Haystack text file, repeatable (default: ../shared/data/books).")]


def _policies(policies: list[str] | None, backend: str) -> list[str]:
    from longkv.policies import make_policy

    specs = policies or ["dense"]
    for p in specs:
        make_policy(p)  # fail fast on an unknown name or knob
    if backend == "transformers" and any(p.split(":")[0].strip().lower() != "dense" for p in specs):
        raise LongKVError("the transformers backend runs dense attention only: pass --policy dense with --backend transformers")
    return specs


def _settings(
    backend: str, model: str | None, dtype: str | None, chunk_size: int, threads: int | None, device: str, weights: str = "auto",
    question_aware: bool = False,
) -> dict[str, Any]:
    from longkv.bench.backends import BACKENDS
    from longkv.config import check_device
    from longkv.engine.llm import check_weights

    if backend not in BACKENDS:
        raise LongKVError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if dtype is not None and dtype not in ("bfloat16", "float32"):
        raise LongKVError(f"unknown dtype {dtype!r}: choose bfloat16 or float32")
    device = check_device(device)
    if backend != "longkv" and device != "cpu":
        raise LongKVError(f"the {backend} backend runs on the CPU: drop --device {device} or use --backend longkv")
    if check_weights(weights) != "auto" and backend != "longkv":
        raise LongKVError(f"--weights is longkv's: drop --weights {weights} or use --backend longkv")
    if question_aware and backend != "longkv":
        raise LongKVError(f"--question-aware is longkv's (the {backend} backend reads densely): drop it or use --backend longkv")
    settings = {"name": backend, "model": model, "dtype": dtype, "chunk_size": chunk_size, "threads": threads, "device": device}
    return settings | ({"weights": weights, "question_aware": question_aware} if backend == "longkv" else {})


def _command() -> str:
    return "longkv " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _finish(folder: Any, written: int) -> None:
    from longkv.bench.report import write_summary

    summary = write_summary(folder)
    out.print(f"{written} new rows; results in {folder.path}/ (summary: {summary})", soft_wrap=True)
    out.print(summary.read_text().split("\n\n![")[0], markup=False, soft_wrap=True)  # lines whole: the command copies


def run_sample_task(
    kind: str,
    make_task: Any,
    options: dict[str, Any],
    model: str | None,
    policies: list[str] | None,
    lengths: str,
    depths: list[float] | None,
    samples: int,
    seed: int,
    name: str,
    runs_dir: Path,
    ray: str | None,
    backend: str,
    dtype: str | None,
    threads: int | None,
    chunk_size: int,
    quiet: bool,
    haystack: list[str],
    device: str = "cpu",
    weights: str = "auto",
    question_aware: bool = False,
) -> Any:
    """Shared body of ``niah`` and ``ruler``: open the run, generate pending samples, answer them, summarise."""
    from longkv.bench.backends import load_tokenizer, make_backend
    from longkv.bench.runner import RunFolder, pending_jobs, run_jobs
    from longkv.bench.tasks import PromptFormat, parse_lengths

    if samples < 1:
        raise LongKVError(f"--samples must be at least 1, got {samples}")
    specs = _policies(policies, backend)
    lens = parse_lengths(lengths)
    settings = _settings(backend, model, dtype, chunk_size, threads, device, weights, question_aware)
    folder = RunFolder(runs_dir, name)
    config = {
        "kind": kind, "model": model, "seed": seed, "backend": backend, "dtype": dtype, "chunk_size": chunk_size, "device": settings["device"],
        "weights": weights, "question_aware": question_aware,
        "haystack": haystack, "options": options, "policies": specs, "lengths": lens, "depths": depths,
        "samples": samples, "command": _command(),
    }  # fmt: skip
    folder.open(config)
    # Samples come from the tokenizer alone; the model loads only if something is left to run.
    be = None
    if ray is None and backend == "longkv" and not folder.done_keys():
        be = make_backend(**settings)
        tokenizer = be.tokenizer
    else:
        tokenizer = load_tokenizer(model)
    task = make_task()
    jobs = pending_jobs(folder, specs, lambda: task.samples(PromptFormat(tokenizer), lens, depths, samples, seed))
    if not quiet:
        out.print(f"{len(jobs)} samples to run in {folder.path}")
    written = run_jobs(folder, jobs, settings, be, ray, quiet=quiet)
    _finish(folder, written)
    return folder


@bench_app.command(cls=Command)
def niah(
    model: Model = None,
    policy: Policies = None,
    lengths: Lengths = "1k,2k,4k",
    depths: Annotated[str, typer.Option(help="Needle depths: fractions (0,0.5,1), or a whole count of 2 or more evenly spaced depths "
                                             "(5 = 0,0.25,...,1); 0 or 1 alone is a depth, not a count.")] = "5",
    samples: Samples = 2,
    seed: Seed = 0,
    haystack: Haystack = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer tokens to generate.")] = 16,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    ray: Ray = None,
    backend: Backend = "longkv",
    dtype: Dtype = None,
    threads: Threads = None,
    device: Device = "cpu",
    chunk_size: ChunkSize = 512,
    weights: Weights = "auto",
    question_aware: QuestionAware = False,
    quiet: Quiet = False,
) -> None:
    """Needle-in-a-haystack: a 7-digit number hidden at each depth of real text, at each length.

    Example: longkv bench niah --lengths 2k,4k,8k --depths 5 --samples 2 -p dense -p streaming:budget=1024
    """
    from longkv.bench.niah import NiahTask
    from longkv.bench.tasks import load_haystack, parse_depths

    hay_paths = [str(p) for p in haystack] if haystack else None
    texts = load_haystack(hay_paths)
    depth_list = parse_depths(depths)
    run_sample_task(
        "niah", lambda: NiahTask(texts, max_new_tokens), {"max_new_tokens": max_new_tokens}, model, policy, lengths, depth_list,
        samples, seed, name or "niah", runs_dir, ray, backend, dtype, threads, chunk_size, quiet, hay_paths or ["<books>"], device, weights,
        question_aware,
    )  # fmt: skip


@bench_app.command(cls=Command)
def ruler(
    model: Model = None,
    policy: Policies = None,
    tasks: Annotated[str, typer.Option(help="'all' or task names / families: niah_single,niah_multikey_2,vt,cwe,fwe,...")] = "all",
    lengths: Lengths = "1k,2k,4k",
    samples: Samples = 2,
    seed: Seed = 0,
    haystack: Haystack = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    ray: Ray = None,
    backend: Backend = "longkv",
    dtype: Dtype = None,
    threads: Threads = None,
    device: Device = "cpu",
    chunk_size: ChunkSize = 512,
    weights: Weights = "auto",
    question_aware: QuestionAware = False,
    quiet: Quiet = False,
) -> None:
    """RULER-style tasks (Hsieh et al. 2024): needle variants, variable tracking, common/frequent words.

    The QA tasks (SQuAD, HotpotQA) are not included. Example: longkv bench ruler --tasks niah_multikey,vt --lengths 4k
    """
    from longkv.bench.ruler import RulerSuite, parse_tasks
    from longkv.bench.tasks import load_haystack

    names = parse_tasks(tasks)
    hay_paths = [str(p) for p in haystack] if haystack else None
    texts = load_haystack(hay_paths)
    run_sample_task(
        "ruler", lambda: RulerSuite(names, texts), {"tasks": names}, model, policy, lengths, None,
        samples, seed, name or "ruler", runs_dir, ray, backend, dtype, threads, chunk_size, quiet, hay_paths or ["<books>"], device, weights,
        question_aware,
    )  # fmt: skip


def _open_simple(kind: str, name: str, runs_dir: Path, config: dict[str, Any]) -> Any:
    from longkv.bench.runner import RunFolder

    folder = RunFolder(runs_dir, name)
    folder.open({"kind": kind, "backend": "longkv", **config, "command": _command()})
    return folder


@bench_app.command(cls=Command)
def ppl(
    model: Model = None,
    policy: Policies = None,
    lengths: Annotated[str, typer.Option(help="Prefix lengths in tokens before the scored tokens (k = 1000).")] = "1k,4k",
    eval_tokens: Annotated[int, typer.Option(help="Tokens scored one by one after the prefix.")] = 128,
    samples: Samples = 1,
    seed: Seed = 0,
    haystack: Haystack = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    dtype: Dtype = None,
    threads: Threads = None,
    device: Device = "cpu",
    chunk_size: ChunkSize = 512,
    weights: Weights = "auto",
    quiet: Quiet = False,
) -> None:
    """Perplexity under each policy, token by token after a chunked prefix (streaming evaluation, as in StreamingLLM).

    Example: longkv bench ppl --lengths 2k,8k,16k -p dense -p streaming:budget=1024 --eval-tokens 128
    """
    from longkv.bench.ppl import run_ppl
    from longkv.bench.tasks import load_haystack, parse_lengths
    from longkv.config import check_device
    from longkv.engine.llm import LLM, check_weights

    if eval_tokens < 1 or samples < 1:
        raise LongKVError(f"--eval-tokens and --samples must be at least 1, got {eval_tokens} and {samples}")
    specs = _policies(policy, "longkv")
    lens = parse_lengths(lengths)
    device = check_device(device)  # before the run folder is written
    hay_paths = [str(p) for p in haystack] if haystack else None
    texts = load_haystack(hay_paths)
    check_weights(weights)
    folder = _open_simple("ppl", name or "ppl", runs_dir, {
        "model": model, "seed": seed, "dtype": dtype, "chunk_size": chunk_size, "device": device, "haystack": hay_paths or ["<books>"],
        "weights": weights,
        "options": {"eval_tokens": eval_tokens}, "policies": specs, "lengths": lens, "samples": samples,
    })  # fmt: skip
    llm = LLM(model, dtype=dtype or "bfloat16", chunk_size=chunk_size, threads=threads, device=device, weights=weights)
    _finish(folder, run_ppl(folder, llm, texts, specs, lens, eval_tokens, samples, seed, quiet))


@bench_app.command(cls=Command)
def speed(
    model: Model = None,
    policy: Policies = None,
    lengths: Lengths = "1k,2k,4k",
    vs: Annotated[list[str] | None, typer.Option("--vs", help="Competitor on the same model file, repeatable: llama.cpp, transformers.")] = None,
    repeats: Annotated[int, typer.Option("--samples", help="Measurements per cell (the summary shows medians).")] = 1,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded after the prompt.")] = 32,
    seed: Seed = 0,
    haystack: Haystack = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    dtype: Dtype = None,
    threads: Threads = None,
    device: Device = "cpu",
    chunk_size: ChunkSize = 512,
    weights: Weights = "auto",
    quiet: Quiet = False,
) -> None:
    """Prefill/decode tokens per second, TTFT and KV memory vs context length; --vs runs competitors on the same file.

    Example: longkv bench speed --lengths 1k,4k,8k -p dense -p streaming:budget=1024 --vs llama.cpp --threads 2
    """
    import torch

    from longkv.bench.competitors import COMPETITORS
    from longkv.bench.speed import run_speed
    from longkv.bench.tasks import load_haystack, parse_lengths
    from longkv.config import check_device
    from longkv.engine.llm import LLM, check_weights
    from longkv.loading import resolve

    competitors = vs or []
    for c in competitors:
        if c not in COMPETITORS:
            raise LongKVError(f"unknown competitor {c!r}: choose {' or '.join(COMPETITORS)}")
    if repeats < 1 or decode_tokens < 2:
        raise LongKVError(f"--samples must be >= 1 and --decode-tokens >= 2, got {repeats} and {decode_tokens}")
    specs = _policies(policy, "longkv")
    lens = parse_lengths(lengths)
    device = check_device(device)  # before the run folder is written
    hay_paths = [str(p) for p in haystack] if haystack else None
    texts = load_haystack(hay_paths)
    n_threads = threads or torch.get_num_threads()
    check_weights(weights)
    folder = _open_simple("speed", name or "speed", runs_dir, {
        "model": model, "seed": seed, "dtype": dtype, "chunk_size": chunk_size, "device": device, "haystack": hay_paths or ["<books>"],
        "weights": weights,
        "options": {"decode_tokens": decode_tokens, "threads": n_threads}, "policies": specs, "lengths": lens, "vs": competitors,
    })  # fmt: skip
    llm = LLM(model, dtype=dtype or "bfloat16", chunk_size=chunk_size, threads=n_threads, device=device, weights=weights)
    written = run_speed(folder, llm, resolve(model), texts, specs, lens, competitors, repeats, decode_tokens, n_threads, seed, quiet)
    _finish(folder, written)


@bench_app.command(cls=Command)
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (of one kind) to merge.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the merged summary.md and PNGs.")] = Path("runs/report"),
) -> None:
    """Merge runs into one comparison table and plots (accuracy vs length and keep-ratio, or speed vs length)."""
    from longkv.bench.report import merge

    path = merge([str(r) for r in runs], out_dir)
    out.print(f"merged {len(runs)} run(s) into {path}", soft_wrap=True)
    Console(highlight=False).print(path.read_text().split("\n\n![")[0], markup=False, soft_wrap=True)  # the report: stdout
