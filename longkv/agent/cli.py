"""``longkv agent run | resume | show | rm``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from longkv.errors import LongKVError
from longkv.helpflag import Command, Group

agent_app = typer.Typer(
    cls=Group,
    name="agent",
    no_args_is_help=True,
    help="An agent that plans, runs tools in a sandbox (bash, python, files, search) and keeps a durable run log.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a progress line stays one line in a log file

RunsDirOpt = Annotated[Path | None, typer.Option(help="Where the run log lives (default: agent-runs in $LONGKV_HOME, which is ~/.cache/longkv unless set).")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object instead of text.")]


def gist(output: str, width: int = 100) -> str:
    """One line for a tool result: its first line (cut to ``width`` characters), how many lines follow, and a
    closing status line (``[exit code N]``, ``[killed: ...]``) when there is one."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()] or [""]
    head = lines[0].strip()
    head = head if len(head) <= width else head[: width - 3] + "..."
    status = lines[-1] if len(lines) > 1 and lines[-1].startswith(("[exit code", "[killed", "[output cut")) else None
    more = len(lines) - 1 - (status is not None)
    return head + (f" (+{more} lines)" if more else "") + (f" {status}" if status else "")


def _progress(quiet: bool) -> Any:
    """An event printer for stderr: one line per model call and per tool result."""
    if quiet:
        return None

    def on_event(ev: Any) -> None:
        d = ev.data
        if ev.kind == "reply":
            u = d["usage"]
            cut = d.get("truncated")
            calls = ", ".join(f"{c['name']}({c['arguments'][:60]})" for c in d["tool_calls"]) or (
                f"{cut.get('name') or 'a tool call'} (cut off at the token limit)" if cut else repr(d["content"][:80]))
            err.print(f"[bold]step {d.get('step', '')}[/] {escape(calls)}  [dim]{u['prompt']} prompt ({u['cached']} cached), {u['completion']} decoded, {d['seconds']:.1f} s[/]")
        elif ev.kind == "tool_result":
            err.print(f"  [dim]{escape(d['name'])} -> {escape(gist(d['output']))}[/]")
        elif ev.kind == "note" and d.get("source") != "user":
            err.print(f"  [yellow]{escape(d['content'][:120])}[/]")
        elif ev.kind == "request" and d.get("drop"):
            err.print(f"  [dim]{d['drop']} earlier step(s) left the context to fit the window[/]")

    return on_event


def _finish(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        if result.status == "stopped":  # the answer below was asked for at a limit: say so before it, not only in the summary
            err.print(f"[yellow]stopped: {escape(result.stop_reason)}; the answer below is the model's best effort at that point, "
                      "not checked by a finish of its own[/]")  # fmt: skip
        print(result.answer)
        cache = f"{result.cached_tokens / result.prompt_tokens:.0%}" if result.prompt_tokens else "-"
        err.print(f"[dim]run {result.run}: {result.status} ({result.stop_reason}) after {result.steps} steps; "
                  f"{result.prompt_tokens} prompt tokens, {cache} from the prefix cache; {result.completion_tokens} decoded; "
                  f"{result.seconds:.1f} s[/]")  # fmt: skip
    if result.status == "failed":
        raise typer.Exit(1)
    if result.status == "stopped":
        raise typer.Exit(3)


def _loading(model: str) -> None:
    err.print(f"[dim]loading {escape(model)} and serving it in this process (--server URL uses a running server) ...[/]")


@agent_app.command(cls=Command)
def run(
    task: Annotated[str, typer.Argument(metavar="TASK", help="What to do, in words (or @FILE to read it from a file).")],
    workdir: Annotated[Path, typer.Option(help="The folder the tools work in.")] = Path("."),
    model: Annotated[str | None, typer.Option("--model", "-m", help="A .gguf file, HF folder or hub id, served in this process (default: SmolLM2-135M-Instruct; a coder model such as Qwen2.5-Coder-1.5B does far better).")] = None,
    server: Annotated[str | None, typer.Option(help="Use an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1 (longkv serve, vLLM, llama.cpp).")] = None,
    model_id: Annotated[str | None, typer.Option(help="Model id to send to --server (default: its first model).")] = None,
    max_steps: Annotated[int, typer.Option(help="Most model calls; then one more asks for the final answer.")] = 40,
    max_tokens: Annotated[int, typer.Option(help="Most prompt + completion tokens over the run.")] = 2_000_000,
    max_seconds: Annotated[float, typer.Option(help="Most seconds of model and tool time over the run.")] = 3600.0,
    no_sandbox: Annotated[bool, typer.Option("--no-sandbox", metavar="", help="Run bash/python without bubblewrap: no isolation at all (only the time and size limits).")] = False,
    context_window: Annotated[int | None, typer.Option(help="Window in tokens, for servers whose /v1/models reports none.")] = None,
    reply_tokens: Annotated[int, typer.Option(help="max_tokens of each model call (a call longer than that is cut and the model is told).")] = 512,
    observation_chars: Annotated[int, typer.Option(help="Most characters of one tool result put back in the context (head + tail; the run log keeps all).")] = 8000,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads of the in-process model (default: all cores).")] = None,
    device: Annotated[str, typer.Option(help="Device of the in-process model: cpu, cuda or cuda:N.")] = "cpu",
    kv_memory: Annotated[bool | None, typer.Option("--kv-memory/--no-kv-memory", metavar="", help="Keep the run's context as KV memory on the server: tool results compressed once read (when a prompt fills half the window), dropped turns cut out of the KV without a new prefill (docs/memory.md). Default: on in process and with a longkv server.")] = None,
    plan: Annotated[bool, typer.Option("--plan/--no-plan", metavar="", help="Ask the model for a short plan first and again after a loop. --no-plan goes straight to the tools.")] = True,
    recall: Annotated[bool | None, typer.Option("--recall/--no-recall", metavar="", help="Number the tool results (\\[result N]) and offer the recall tool, which shows old ones again word for word after its KV was compressed or its turn left the context. Default: on with KV memory.")] = None,
    runs_dir: RunsDirOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress on stderr.")] = False,
) -> None:
    """Run a task: plan, call tools, observe, repeat until the model calls finish (or a limit is reached).

    Examples:

      longkv agent run "Which function in src/ parses dates? Add a test for Feb 29." --workdir ./repo --model qwen2.5-coder-1.5b.gguf

      longkv agent run @task.md --server http://127.0.0.1:8000/v1 --json

    Every event goes to a durable run log first: longkv agent show RUN prints the trajectory, longkv agent resume RUN goes on after a crash or a kill.

    Exit status: 0 when the model finished, 3 when the run stopped at a limit (its answer is a best effort from what was learned), 1 when it failed, 2 for a bad command line; agent resume exits the same way.
    """
    from longkv.agent.agent import Agent

    if task.startswith("@"):
        try:
            task = Path(task[1:]).read_text()
        except OSError as exc:
            raise LongKVError(f"cannot read the task file {task[1:]!r} ({exc.strerror}): check the path after @") from None
        except UnicodeDecodeError as exc:
            raise LongKVError(f"the task file {task[1:]!r} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    if model is not None and server is not None:
        raise LongKVError("--model and --server both given: --model runs a model in this process, --server uses a running one; pick one")
    if not task.strip():
        raise LongKVError("the task is empty: say what the agent should do")
    agent = Agent(model=model, server=server, model_id=model_id, workdir=workdir, max_steps=max_steps, max_tokens=max_tokens,
                  max_seconds=max_seconds, sandbox=not no_sandbox, runs_dir=runs_dir, context_window=context_window,
                  reply_tokens=reply_tokens, observation_chars=observation_chars, temperature=temperature, threads=threads,
                  device=device, kv_memory=kv_memory, recall=recall, plan=plan, on_loading=None if quiet else _loading)  # fmt: skip
    with agent:
        result = agent.run(task, on_event=_progress(quiet))
    _finish(result, as_json)


@agent_app.command(cls=Command)
def resume(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run's id (or a unique start or end of it, e.g. its last 4 characters).")],
    message: Annotated[str | None, typer.Option(help="A message from you, added before it goes on (also to a run that has ended).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Serve this model here instead of the run's own source.")] = None,
    server: Annotated[str | None, typer.Option(help="Use this server instead of the run's own source.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads of the in-process model (default: all cores).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="A new step cap, counted from the run's start: lets a run that stopped at its cap go on.")] = None,
    runs_dir: RunsDirOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress on stderr.")] = False,
) -> None:
    """Go on with a run after a crash, a kill -9 or a reboot, from its log.

    A tool call cut off mid-way is run again only if it cannot change anything (read_file, search); any other is reported to the model as interrupted, with the files changed since it started.

    Examples:

      longkv agent resume 20261204-153000-ab12

      longkv agent resume 20261204-153000-ab12 --max-steps 80     # it stopped at its 40-step cap: go on
    """
    from longkv.agent.agent import Agent, RunResult, default_runs_dir
    from longkv.agent.runlog import RunLog
    from longkv.agent.state import RunState

    log = RunLog(runs_dir or default_runs_dir(), create=False)
    try:
        info = log.info(run_id)
        events = log.events(info.id)
    finally:
        log.close()
    start = next((e.data for e in events if e.kind == "start"), None)
    if start is None:
        raise LongKVError(f"run {info.id} has no start event: it cannot be resumed")
    st = RunState.replay(events)
    if not st.goes_on(message, max_steps):  # ended: nothing to load a model for
        if not quiet:
            more = f", or --max-steps above {st.steps}" if st.goes_on(None, st.steps + 1) else ""
            err.print(f"[dim]run {info.id} has ended ({st.status}): pass --message to go on with it{more}[/]")
        _finish(RunResult.of(info.id, st), as_json)
        return
    o = start["options"]
    src = o.get("source", {})
    if model is None and server is None:
        model, server = src.get("model"), src.get("server")
    agent = Agent(model=model, server=server, model_id=src.get("model_id") if server else None, workdir=info.workdir,
                  max_steps=o["max_steps"], max_tokens=o["max_tokens"], max_seconds=o["max_seconds"], sandbox=o["sandbox"],
                  runs_dir=runs_dir, context_window=src.get("context_window"), reply_tokens=o["reply_tokens"],
                  observation_chars=o["observation_chars"], temperature=o["temperature"], threads=threads,
                  kv_memory=o.get("kv_memory") if model is None and server is None else None,
                  on_loading=None if quiet else _loading)  # fmt: skip
    if not quiet:
        err.print(f"[dim]resuming run {info.id} ({info.status}) in {info.workdir}[/]")
    with agent:
        result = agent.resume(info.id, message=message, on_event=_progress(quiet), max_steps=max_steps)
    _finish(result, as_json)


@agent_app.command(cls=Command)
def show(
    run_id: Annotated[str | None, typer.Argument(metavar="RUN", help="The run (default: list the latest runs).")] = None,
    step: Annotated[int | None, typer.Option(help="Print one step whole: the model's text, each call and its full output.")] = None,
    runs_dir: RunsDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run's trajectory: per step the prompt, cached and new tokens, decode tokens, time, tools and their status.

    Example: longkv agent show 20261204-153000-ab12 --step 3
    """
    from longkv.agent.agent import default_runs_dir
    from longkv.agent.runlog import RunLog
    from longkv.agent.show import render

    if step is not None and run_id is None:
        raise LongKVError("--step needs a run: longkv agent show RUN --step N (longkv agent show lists the runs)")
    log = RunLog(runs_dir or default_runs_dir(), create=False)  # showing writes nothing
    try:
        render(log, run_id, as_json, step, Console(file=sys.stdout, highlight=False))
    finally:
        log.close()


@agent_app.command(cls=Command)
def rm(
    run_ids: Annotated[list[str] | None, typer.Argument(metavar="RUN...", help="Runs to remove (an id, or its start or end).")] = None,
    ended: Annotated[bool, typer.Option("--ended", metavar="", help="Remove every run that has ended (finished, stopped or failed).")] = False,
    runs_dir: RunsDirOpt = None,
) -> None:
    """Remove runs from the run log, with the KV snapshots an in-process run saved for resume (tens of MB each).

    A run a live process drives is refused; an interrupted one can be removed. Sessions a separate longkv serve saved live in its --memory-dir.

    Example: longkv agent rm --ended
    """
    from longkv.agent.agent import default_runs_dir
    from longkv.agent.runlog import RunLog

    if not run_ids and not ended:
        raise LongKVError("name the runs to remove, or pass --ended to remove every run that has ended (longkv agent show lists them)")
    if run_ids and ended:
        raise LongKVError("name runs or pass --ended, not both: --ended removes every ended run, whatever the names")
    log = RunLog(runs_dir or default_runs_dir(), create=False)
    try:
        ids = [log.info(r).id for r in run_ids or []]  # every id checked before anything is removed
        if ended:
            ids += [i.id for i in log.runs(limit=-1) if i.status in ("finished", "stopped", "failed") and i.id not in ids]
        for run_id in ids:
            if (pid := log.owner(run_id)) is not None:
                raise LongKVError(f"run {run_id} is being driven by pid {pid}: wait for it, or stop that process (nothing was removed)")
        for run_id in ids:
            freed = log.delete(run_id)
            print(f"removed {run_id}" + (f" (freed {freed / (1 << 20):.1f} MiB of KV)" if freed else ""))
        if not ids:
            print(f"no ended runs in {log.dir}")
    finally:
        log.close()
