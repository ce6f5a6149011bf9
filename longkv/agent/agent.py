"""The agent loop: model call -> tool calls -> observations -> repeat, every event logged before the next action.

:class:`Agent` runs a task in a workdir against an OpenAI-compatible server (or
a model file served in this process) and returns a :class:`RunResult`. Each
iteration appends one event to the run log and applies it to the
:class:`~longkv.agent.state.RunState`; nothing else carries state, which is what
makes :meth:`Agent.resume` exact after a crash, a kill -9 or a reboot.

Stop rules, each ending with a best-effort final answer (one last request that
must call ``finish``), never a bare exception: the step cap (default 40), the
token cap, the time cap, and three replies in a row with no tool call (empty, or cut off). A call that
only repeats the last one (or the one before it, neither changing a file) is not run again, and its tool
stays closed until a call runs (against a longkv server the call also leaves the context and the step is asked
again; elsewhere a note says what it repeats). Loops (the same call with the same result three times, the same error
three times, a round of two or three calls made twice with the same outcomes: :func:`find_loop`) are recovered: the repeats leave the context, a hint is added, the temperature goes up for a
few requests and the next request must update the plan.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longkv.agent.client import ChatClient, LocalServer, ModelError, Reply, local_server
from longkv.agent.runlog import Event, RunLog
from longkv.agent.state import Pending, RunState, message_bytes, partial_string, signature
from longkv.agent.toolkit import Tool, ToolContext, ToolError
from longkv.agent.tools import Toolbox, is_shell_command, is_step_list
from longkv.agent.workdir import changes, listing, snapshot
from longkv.config import ASK_DRY_MULTIPLIER
from longkv.errors import LongKVError

SYSTEM = """You are an agent that completes a task in a folder by calling tools.
Work step by step: a short numbered plan first, then carry it out with the tools (bash, python, read_file, write_file, edit_file, search), one call at a time.
Tool results are real: read them before the next step. Paths are relative to the folder.
When the task is done, call finish with the answer (the value asked for, or what you changed)."""
SYSTEM_NO_PLAN = SYSTEM.replace("step by step: a short numbered plan first, then carry it out with the tools", "step by step with the tools")  # plan=False

PLAN_CHOICE = {"type": "function", "function": {"name": "plan"}}
HOT_TEMPERATURE = 0.7  # sampling temperature for a few requests after a loop was detected
SAVE_EVERY = 5  # with KV memory in process: the session is saved to disk every this many steps (for resume)
MEMORY_ROOM = 4  # with KV memory the history sent may reach this many windows: the server compresses, stubs and drops its KV to fit
TOOL_KEEP = 0.5  # with KV memory: the share of a tool result's KV kept once it has been read, ...
COMPRESS_FROM = 0.5  # ... once the prompt passes this share of the room the window leaves (before that all of it stays)


LOOPS = ((1, 3), (2, 2), (3, 2))
"""The loops recovered, as (period, rounds): one call and outcome three times in a row, or a round of two or three
calls made twice over with the same outcomes (Qwen2.5-Coder-1.5B went round ``edit_file`` (same text), ``write_file``
(not Python) and a broken ``sed`` until the step cap; the 0.5B model alternated two commands)."""


def find_loop(history: list[tuple[str, str, bool]]) -> tuple[int, int] | None:
    """The loop at the end of ``history`` ((call signature, result hash, is error) per call), as (period, rounds)
    from :data:`LOOPS`, or None. Two calls have the same outcome when they are the same call with the same result,
    or both errors with the same text (the same error from other arguments is the same dead end); a repeat that was
    not run counts as its original's result."""

    def same(a: tuple[str, str, bool], b: tuple[str, str, bool]) -> bool:
        return a[1] == b[1] and (a[0] == b[0] or (a[2] and b[2]))

    for period, rounds in LOOPS:
        n = period * rounds
        tail = history[-n:]
        if len(tail) < n or not all(same(tail[i], tail[i + period]) for i in range(n - period)):
            continue
        if all(not same(a, b) for i, a in enumerate(tail[:period]) for b in tail[i + 1 : period]):  # a true round
            return period, rounds
    return None


def spread_error(history: list[tuple[str, str, bool]], window: int = 6) -> int | None:
    """How many calls ago the first of three identical errors among the last ``window`` calls came, when the
    latest call is the third of them (a dead end the model goes back to between other calls: Qwen2.5-Coder-1.5B
    alternated a refused ``write_file`` with ``recall``), or None."""
    if not history or not history[-1][2]:
        return None
    tail = history[-window:]
    hits = [i for i, (_, outcome, error) in enumerate(tail) if error and outcome == tail[-1][1]]
    return len(tail) - 1 - hits[-3] if len(hits) >= 3 else None


def default_runs_dir() -> Path:
    """``$LONGKV_HOME/agent-runs`` (``~/.cache/longkv/agent-runs``)."""
    from longkv.config import longkv_home

    return longkv_home() / "agent-runs"


@dataclass(frozen=True)
class RunResult:
    """How a run ended. ``status``: finished (the model called finish or answered), stopped (a cap or the
    no-call rule; ``answer`` is the best effort), failed (the model server failed; ``reason`` says how)."""

    run: str
    status: str
    answer: str
    steps: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    seconds: float
    stop_reason: str

    @classmethod
    def of(cls, run_id: str, st: RunState) -> RunResult:
        """Where the run ``run_id`` stands, from its replayed state."""
        return cls(run_id, st.status, st.answer or "", st.steps, st.prompt_tokens, st.cached_tokens, st.completion_tokens,
                   round(st.seconds, 3), st.reason or "")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bound(text: str, limit: int) -> str:
    """``text`` cut to at most about ``limit`` characters: its head and tail, the cut marked with its size."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut: the whole output is in the run log (longkv agent show) ...]\n{text[-tail:]}"


def cut_note(reply: Reply, limit: int) -> str:
    """What the model hears after a reply cut off at the token limit (``limit`` tokens): what was cut and how
    to make it fit."""
    name = (reply.truncated or {}).get("name")
    if name in ("write_file", "edit_file"):
        return f"Your {name} call was cut off at the token limit ({limit} tokens): write big files in parts."
    if name:
        return f"Your {name} call was cut off at the token limit ({limit} tokens): make its arguments shorter."
    return f"Your reply was cut off at the token limit ({limit} tokens): make it shorter, or call a tool."


def cut_plan(reply: Reply, limit: int) -> dict[str, Any]:
    """The note event for a plan cut off at the token limit (``limit`` tokens): its whole lines become the plan
    when they list steps (``{"content", "plan"}``), else the run goes on without one (``{"content", "planless"}``)."""
    text = partial_string((reply.truncated or {}).get("text") or "", "plan") or ""
    lines = text.split("\n")[:-1]  # the last line was cut mid-way
    while lines and not lines[-1].strip():
        lines.pop()
    kept = "\n".join(lines).strip()
    if is_step_list(kept):
        return {"content": f"Your plan was cut off at the token limit ({limit} tokens); its first {len(lines)} lines are kept "
                           "as your plan (at the top). Carry it out from step 1 with the other tools, one call at a time.", "plan": kept}  # fmt: skip
    return {"content": f"Your plan was cut off at the token limit ({limit} tokens) and is not kept: go on without a plan, "
                       "with the other tools, one call at a time.", "planless": True}  # fmt: skip


def _memory_summary(memory: dict[str, Any] | None) -> dict[str, Any]:
    """What the run log keeps of a KV memory report: the KV and logical tokens, and the edits by kind
    (``{"compress": 2, "stub": 1}``) with the KV tokens they freed."""
    if not memory:
        return {}
    kinds: dict[str, int] = {}
    freed = 0
    for e in memory.get("edits") or []:
        kind = next((k for k in ("drop", "align", "cut", "compress", "stub", "prefill") if k in e), "other")
        kinds[kind] = kinds.get(kind, 0) + 1
        freed += int(e.get("tokens") or 0) if kind != "prefill" else 0
    return {"memory": {"kv_tokens": memory.get("kv_tokens"), "logical_tokens": memory.get("logical_tokens"), "edits": kinds, "freed": freed}}


class Agent:
    """A tool-using agent over one model.

    Args:
        model: a .gguf file, HF folder or hub id to serve in this process (ignored with ``server``).
        server: base URL of an OpenAI-compatible server, e.g. ``http://127.0.0.1:8000/v1``.
        model_id: the model id to send (default: the server's first).
        workdir: the folder the tools work in (must exist).
        tools: extra :func:`~longkv.agent.toolkit.tool` functions (a name of a built-in replaces it).
        max_steps: most model calls (default 40); max_tokens: most prompt + completion tokens over the run;
        max_seconds: most seconds of model and tool time over the run (across resumes).
        sandbox: run bash/python under bubblewrap (False: ``--no-sandbox``, no isolation).
        limits: the sandbox's :class:`~longkv.agent.sandbox.Limits`.
        runs_dir: where the run log lives (default :func:`default_runs_dir`).
        context_window: the window in tokens, for servers whose ``/v1/models`` reports none.
        reply_tokens: ``max_tokens`` of each model call (kept free in the window).
        observation_chars: most characters of one tool result put back in the context (the run log keeps all).
        temperature: sampling temperature (0: greedy).
        kv_memory: keep the run's context on the server as KV memory spans (``longkv serve`` only): tool
            results are compressed once read (once a prompt fills half the window) and dropped turns are cut
            out of the KV, without a new prefill (docs/memory.md). Default: on with a model served in this process or a longkv server.
        recall: number the tool results (``[result N]`` in their first line) and offer the ``recall`` tool, which
            puts one back whole at the end of the context (after its KV was compressed or its turn dropped).
            Default: on with KV memory.
        plan: ask for a short plan first and after a loop (the ``plan`` tool); False goes straight to the tools.
        on_loading: called with the model's name just before a model is loaded in this process (the options
            are checked by then), e.g. to say that loading may take a while.

    Raises:
        LongKVError: no workdir, an option out of range (a count below 1, a temperature outside 0-2), no sandbox
            (without ``sandbox=False``), an unreachable server or one without a reported window, a model that
            cannot be loaded.
    """

    def __init__(
        self,
        model: str | None = None,
        server: str | None = None,
        model_id: str | None = None,
        workdir: str | os.PathLike[str] = ".",
        tools: list[Tool] | tuple[Tool, ...] = (),
        max_steps: int = 40,
        max_tokens: int = 2_000_000,
        max_seconds: float = 3600.0,
        sandbox: bool = True,
        limits: Any = None,
        runs_dir: str | os.PathLike[str] | None = None,
        context_window: int | None = None,
        reply_tokens: int = 512,
        observation_chars: int = 8000,
        temperature: float = 0.0,
        threads: int | None = None,
        device: str = "cpu",
        kv_memory: bool | None = None,
        recall: bool | None = None,
        plan: bool = True,
        on_loading: Callable[[str], None] | None = None,
    ) -> None:
        from longkv.agent.sandbox import Limits, Sandbox

        self.workdir = Path(workdir).expanduser().resolve()
        if not self.workdir.is_dir():
            raise LongKVError(f"workdir {self.workdir} is not a folder: create it or pass --workdir to an existing one")
        if self.workdir == Path(self.workdir.anchor):
            raise LongKVError(f"workdir {self.workdir} is the root of the file system: the tools would write anywhere; pass a project folder")
        for name, value in (("max_steps", max_steps), ("max_tokens", max_tokens), ("reply_tokens", reply_tokens), ("observation_chars", observation_chars)):
            if value < 1:
                raise LongKVError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {value}")
        if not 0.0 <= temperature <= 2.0:
            raise LongKVError(f"temperature must be 0 to 2, got {temperature}: 0 is greedy, 0.7 a usual sampling value")
        if max_seconds <= 0:
            raise LongKVError(f"max_seconds (--max-seconds) must be above 0, got {max_seconds}: it caps the run's model and tool time")
        if threads is not None and threads < 1:
            raise LongKVError(f"threads (--threads) must be at least 1, got {threads}: leave it out to use every core")
        self._extra = tuple(tools)
        self.toolbox = Toolbox.of(self._extra)  # a bad tool fails here, before a model loads (recall is added below)
        self.sandbox = Sandbox(self.workdir, limits or Limits(), enabled=sandbox)
        self.ctx = ToolContext(self.workdir, self.sandbox)
        self.log = RunLog(Path(runs_dir) if runs_dir else default_runs_dir())
        self.options: dict[str, Any] = {"max_steps": max_steps, "max_tokens": max_tokens, "max_seconds": max_seconds, "reply_tokens": reply_tokens,
                        "observation_chars": observation_chars, "temperature": temperature, "sandbox": sandbox, "plan": plan}  # fmt: skip
        self.options["source"] = {"model": model if server is None else None, "server": server, "model_id": model_id,
                                  "context_window": context_window}  # what resume reconnects to
        self._local: LocalServer | None = None
        if server is None:
            if on_loading is not None:
                on_loading(model or "the default model")
            self._local = local_server(model, threads=threads, device=device, memory_dir=self.log.dir / "kv")
            server, model_id = self._local.url, model_id or self._local.model_id
        self.client = ChatClient(server, model_id, window=context_window)
        self.window = self.client.window()
        served_here = self._local is not None
        if kv_memory and not served_here and not self.client.is_longkv():
            raise LongKVError(f"{server} is not longkv serve: KV memory needs it (drop --kv-memory, or serve the model with longkv)")
        self.longkv = served_here or self.client.is_longkv()  # speaks longkv's extensions (allowed_tools, KV memory)
        self.kv_memory = kv_memory if kv_memory is not None else self.longkv
        self.options["kv_memory"] = self.kv_memory
        self.options["recall"] = self.kv_memory if recall is None else recall
        self.toolbox = Toolbox.of(self._extra, with_recall=self.options["recall"], with_plan=plan)

    def close(self) -> None:
        """Stop the in-process server (if any) and close the run log."""
        if self._local is not None:
            self._local.close()
            self._local = None
        self.log.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public

    def run(self, task: str, on_event: Callable[[Event], None] | None = None) -> RunResult:
        """Run ``task`` from the start; ``on_event`` sees every event as it is logged."""
        if not task.strip():
            raise LongKVError("the task is empty: say what the agent should do")
        run_id = self.log.create(task, self.workdir)
        with self.log.drive(run_id):
            st = RunState()
            self._emit(run_id, st, "start", {"task": task, "options": self.options, "system": SYSTEM if "plan" in self.toolbox else SYSTEM_NO_PLAN,
                                             "tools": list(self.toolbox.tools), "window": self.window, "files": listing(self.workdir)},
                       on_event)  # fmt: skip
            return self._loop(run_id, st, on_event)

    def resume(self, run_id: str, message: str | None = None, on_event: Callable[[Event], None] | None = None,
               max_steps: int | None = None) -> RunResult:
        """Go on with a run from its log: a tool call cut off mid-way is re-run only if idempotent (read_file,
        search, recall); any other is reported to the model as interrupted, with the files changed since it started.
        ``message``: a user message added before going on (also to a run that has ended). ``max_steps``: a new step
        cap for the run (counted from its start), e.g. to go on after it stopped at its cap.

        Raises:
            LongKVError: no such run, another live process drives it, ``max_steps`` is not above the steps taken,
                or the run was started with tools this agent lacks.
        """
        from longkv.agent.sandbox import reap_stale

        info = self.log.info(run_id)
        with self.log.drive(info.id):
            reap_stale()  # a killed owner's tool call may still be running: end it before judging what it changed
            st = RunState.replay(self.log.events(info.id))
            if Path(info.workdir).resolve() != self.workdir:
                raise LongKVError(f"run {info.id} works in {info.workdir}, not {self.workdir}: pass --workdir {info.workdir}")
            if max_steps is not None and max_steps <= st.steps:
                raise LongKVError(f"run {info.id} has taken {st.steps} steps: give --max-steps above that to let it go on")
            if not st.goes_on(message, max_steps):
                return RunResult.of(info.id, st)  # it has ended: nothing to do without a new message or more steps
            self.toolbox = Toolbox.of(self._extra, with_recall=bool(st.options.get("recall")), with_plan=st.options.get("plan", True))
            missing = [name for name in st.tools if name not in self.toolbox.tools]
            if missing:  # its calls of them would fail, and its prompt (the tool list) would change under it
                raise LongKVError(f"run {info.id} was started with tools this agent lacks ({', '.join(missing)}): resume it from "
                                  f"Python with the same tools, Agent(tools=[...]).resume({info.id!r})")  # fmt: skip
            self._emit(info.id, st, "resume", {"message": message, "max_steps": max_steps}, on_event)
            return self._loop(info.id, st, on_event)

    # ------------------------------------------------------------------ the loop

    def _emit(self, run_id: str, st: RunState, kind: str, data: dict[str, Any], on_event: Callable[[Event], None] | None) -> None:
        ev = self.log.append(run_id, kind, data)
        st.apply(ev)
        if on_event is not None:
            on_event(ev)

    def _loop(self, run_id: str, st: RunState, on_event: Callable[[Event], None] | None) -> RunResult:
        while st.status == "running":
            if st.pending:
                self._tool(run_id, st, st.pending[0], on_event)
                if not st.pending and st.status == "running":
                    self._check_loop(run_id, st, on_event)  # once the reply's calls all have results
                continue
            if st.inbox:
                self._emit(run_id, st, "note", {"content": st.inbox, "source": "user"}, on_event)
            cap = self._cap(st)
            if cap and st.final_request is None:
                self._emit(run_id, st, "note", {"content": f"{cap}. Call finish now with your best final answer from what you have learned.",
                                                "final": cap}, on_event)  # fmt: skip
            elif cap and st.final_asked:  # the final request did not end the run: end it with what there is
                self._emit(run_id, st, "end", {"status": "stopped", "answer": self._best_answer(st), "reason": st.final_request}, on_event)
                break
            try:
                reply = self._request(run_id, st, on_event)
            except ModelError as exc:
                self._emit(run_id, st, "end", {"status": "failed", "answer": self._best_answer(st), "reason": str(exc)}, on_event)
                break
            except LongKVError as exc:  # the front alone does not fit the window
                self._emit(run_id, st, "end", {"status": "failed", "answer": "", "reason": str(exc)}, on_event)
                break
            self._after_reply(run_id, st, reply, on_event)
        return RunResult.of(run_id, st)

    def _cap(self, st: RunState) -> str | None:
        o = st.options
        if st.steps >= o["max_steps"]:
            return f"The step limit ({o['max_steps']} model call{'s' if o['max_steps'] != 1 else ''}) is reached"
        if st.prompt_tokens + st.completion_tokens >= o["max_tokens"]:
            return f"The token limit ({o['max_tokens']} tokens) is reached"
        if st.seconds >= o["max_seconds"]:
            return f"The time limit ({o['max_seconds']:.0f} s) is reached"
        if st.idle_streak >= 3:
            return "Three replies in a row held no tool call (empty, or cut off at the token limit)"
        return None

    @staticmethod
    def _best_answer(st: RunState) -> str:
        """The answer of a finish call the last reply was cut off in, else the last thing the model said in words,
        else the last tool result: what a capped run can offer."""
        if st.cut_answer:
            return f"{st.cut_answer} [cut off at the token limit]"
        for t in reversed(st.turns):
            for m in reversed(t.messages):
                if m["role"] == "assistant" and (m.get("content") or "").strip():
                    return str(m["content"]).strip()
        for t in reversed(st.turns):
            for m in reversed(t.messages):
                if m["role"] == "tool":  # without the label recall numbers it by ([result N]): the context's, not an answer's
                    return re.sub(r"\A\[result \d+\]\n", "", str(m["content"]))[-2000:]
        return ""

    def _fit(self, st: RunState) -> tuple[list[dict[str, Any]], list[int], int]:
        """The request's messages within the window: (messages, steps of the turns dropped now, their bytes).

        When the estimate passes the window less the reply's tokens, whole turns leave oldest first, down to 3/4
        of that room, so that the cached prefix breaks rarely. With KV memory the room is :data:`MEMORY_ROOM`
        windows: the server keeps the history's KV within the window (tool results compressed, old ones stubbed
        to their first line, the oldest dropped) and the text stays whole for ``recall``.

        Raises:
            LongKVError: the system prompt, tools, task and plan alone do not fit.
        """
        room = self.window * (MEMORY_ROOM if self.kv_memory else 1) - st.options["reply_tokens"]
        msgs = st.messages(marker=not self.kv_memory)
        if st.estimate(message_bytes(msgs)) <= room:
            return msgs, [], message_bytes(msgs)
        live = [t for t in st.turns if t.live and not t.folded]
        drop: list[int] = []
        for t in live:
            t.live = False
            drop.append(t.step)
            msgs = st.messages(marker=not self.kv_memory)
            if st.estimate(message_bytes(msgs)) <= room * 3 // 4:
                break
        for t in live:  # the state changes only through the logged request event
            t.live = True
        if st.estimate(message_bytes(msgs)) > room:
            raise LongKVError(f"the system prompt, tools, task and plan need about {st.estimate(message_bytes(msgs))} tokens, more than "
                              f"the {self.window}-token window leaves ({room}): shorten the task or use a model with a larger window")  # fmt: skip
        return msgs, drop, message_bytes(msgs)

    def _request(self, run_id: str, st: RunState, on_event: Callable[[Event], None] | None) -> Reply:
        msgs, drop, nbytes = self._fit(st)
        temperature = HOT_TEMPERATURE if st.hot else st.options["temperature"]
        if st.final_request:
            choice: Any = {"type": "function", "function": {"name": "finish"}}
        elif "plan" in self.toolbox and not st.planless and (st.replan or not st.plan):  # the plan step comes first, and after a loop
            choice = PLAN_CHOICE
        else:
            choice = "required"
        # Tools a longkv server's reply may not call at this step (every tool stays in its prompt, a stable prefix;
        # allowed_tools narrows the call): plan unless asked for (a small model offered it at every step calls
        # nothing else), the tool whose last call only repeated an earlier one, and recall while nothing is there
        # to recall. Other servers get the tools without plan, the same at every step.
        closed: list[str] = []
        if choice == "required" and self.longkv:
            shut = {"plan", *st.barred} | (set() if st.recallable() else {"recall"})
            closed = [n for n in self.toolbox.tools if n in shut]
        self._emit(run_id, st, "request", {"step": st.steps + 1, "bytes": nbytes, "estimate": st.estimate(nbytes), "drop": len(drop),
                                           "drop_steps": drop, "tool_choice": choice, "closed": closed, "temperature": temperature},
                   on_event)  # fmt: skip
        msgs = st.messages(marker=not self.kv_memory)  # the same as _fit's, now that the drop is applied
        tools = self.toolbox.schemas()
        wire: Any = choice
        if "plan" in self.toolbox and choice != PLAN_CHOICE and not self.longkv:
            tools = [t for t in tools if t["function"]["name"] != "plan"]
        if closed:
            wire = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                {"type": "function", "function": {"name": n}} for n in self.toolbox.tools if n not in closed]}}  # fmt: skip
        ext: dict[str, Any] | None = None
        if self.kv_memory:  # the server keeps this run's context as KV spans; in-process, saved every few steps for resume
            # Compressing a result costs a second forward over its tokens (the probe) and its scoring: in a run whose
            # context fills less than half the window it saves no room that is needed, only time (six data tasks of
            # Qwen2.5-Coder-1.5B reading 2-8 K-token files: 822 s with it, 390 s without, docs/agent.md). The results
            # it would compress now came in the last prompt, so the server's count of that prompt decides.
            full = bool(st.observed) and st.observed[-1][1] > COMPRESS_FROM * (self.window - st.options["reply_tokens"])
            ext = {"session": run_id, "memory": {"save": self._local is not None and st.steps % SAVE_EVERY == 0,
                                                  "tool_keep": TOOL_KEEP if full else None}}  # fmt: skip
        if self.longkv and (choice == PLAN_CHOICE or st.final_request):
            # A plan or a final answer is prose: a small greedy model can repeat one of its lines until the reply's
            # token limit (the 0.5B model wrote "N. If 'stats.py' is installed ..." for 512 tokens). The loop guard
            # of longkv ask stops that; the calls that copy text (an edit's old and new) are left without it.
            ext = {**(ext or {}), "dry_multiplier": ASK_DRY_MULTIPLIER}
        return self.client.complete(msgs, tools, wire, temperature, st.options["reply_tokens"], seed=st.steps, longkv=ext)

    def _after_reply(self, run_id: str, st: RunState, reply: Reply, on_event: Callable[[Event], None] | None) -> None:
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
        self._emit(run_id, st, "reply", {"step": st.steps + 1, "content": reply.content, "tool_calls": calls, "finish_reason": reply.finish_reason,
                                         "usage": {"prompt": reply.usage.prompt, "cached": reply.usage.cached,
                                                   "completion": reply.usage.completion},
                                         "seconds": round(reply.seconds, 4), **_memory_summary(reply.memory),
                                         **({"truncated": reply.truncated} if reply.truncated else {})}, on_event)  # fmt: skip
        if calls:
            return
        text = reply.content.strip()
        if reply.finish_reason == "length" and (reply.truncated or {}).get("name") == "plan":
            # asked again, a greedy model writes the same long plan: keep its whole lines, or go on without one
            self._emit(run_id, st, "note", cut_plan(reply, st.options["reply_tokens"]), on_event)
        elif reply.finish_reason == "length":
            self._emit(run_id, st, "note", {"content": cut_note(reply, st.options["reply_tokens"])}, on_event)
        elif not text:
            self._emit(run_id, st, "note", {"content": "Your reply was empty. Call one of the tools, or finish with your answer."}, on_event)
        elif any(s in text for s in ('"name"', "<tool_call>", '"arguments"')):
            self._emit(run_id, st, "note", {"content": "Your reply was not a valid tool call: it was sent as text. Call a tool through the "
                                                       "tools interface, with JSON arguments that match its parameters."}, on_event)  # fmt: skip
        else:  # words and no call: the model's answer
            self._emit(run_id, st, "end", {"status": "stopped" if st.final_request else "finished", "answer": text,
                                           "reason": st.final_request or "answered"}, on_event)  # fmt: skip

    def _tool(self, run_id: str, st: RunState, call: Pending, on_event: Callable[[Event], None] | None) -> None:
        sig = signature(call.name, call.arguments)
        code = _string_argument(call.arguments, "code") if call.name == "python" else None
        if code is not None and is_shell_command(code):  # a shell command sent to python is that bash call (its repeat too)
            sig = signature("bash", json.dumps({"command": code}))
        base = {"id": call.id, "name": call.name, "signature": sig}
        tool = self.toolbox.tools.get(call.name)

        def not_run(out: str, arguments: dict[str, Any], **flags: Any) -> None:  # the result of a call that does not run
            self._emit(run_id, st, "tool_result", {**base, "arguments": arguments, "output": out, "context": out, "error": True,
                                                   "changed": 0, **flags, "seconds": 0.0}, on_event)  # fmt: skip

        if call.started is not None and not (tool and tool.idempotent):  # cut off mid-way by a crash: never re-run
            changed = changes(call.started.get("snapshot") or {}, snapshot(self.workdir), self.workdir)
            what = ", ".join(changed[:30]) + (f" and {len(changed) - 30} more" if len(changed) > 30 else "") if changed else "none"
            out = (f"interrupted: the run stopped while this call was running, and it was not run again. "
                   f"Files changed since it started: {what}. Check the state before repeating it.")  # fmt: skip
            not_run(out, {}, interrupted=True, changed=len(changed))
            return
        try:
            args = json.loads(call.arguments or "{}")
            if not isinstance(args, dict):
                raise ToolError(f"{call.name}: arguments must be a JSON object, got {type(args).__name__}")
        except json.JSONDecodeError as exc:
            args = {}
            err: str | None = f"the arguments are not valid JSON ({exc.msg} at character {exc.pos}): send a JSON object"
        except ToolError as exc:
            args, err = {}, str(exc)
        else:
            err = None
        if err is None and tool is None:
            err = f"there is no tool {call.name!r}: the tools are {', '.join(self.toolbox.tools)}"
        if err is None and call.name == "plan" and st.plan and st.last_choice != PLAN_CHOICE:
            err = ("the plan is set (it is at the top of your context): carry out its next step with another tool. "
                   "You will be asked to rewrite the plan if the work gets stuck")  # fmt: skip
        if err is not None:
            not_run(f"error: {err}", args)
            return
        if call.name == "plan" and not is_step_list(str(args.get("plan", ""))):
            # Qwen2.5-Coder-0.5B wrote its "plan" as the task or a tool's description in other words, and then
            # followed that paragraph: such a plan is not kept, and the run goes on without one
            not_run("not kept: a plan is a numbered list of steps. Go on with the other tools, one call at a time.", args, planless=True)
            return
        repeat = st.repeat_of(sig) if call.name not in ("plan", "finish") else None
        if repeat is not None:  # a small model repeats a call word for word: it is not run again
            which = f"result {repeat}" if st.options.get("recall") else "an earlier call"
            if repeat in st.edited:
                # The same change again, nothing changed since: the model has made it and has no next step but this one.
                # Qwen2.5-Coder-0.5B, told so and asked on, wrote over the file it had just fixed; it is asked to finish.
                # (A command that only made new files, e.g. a test run sent to output.txt, is a plain repeat below.)
                # The repeat and its result leave the context (the model copied such a note into its answer); the
                # change's own result stays in view for the answer.
                not_run(f"not run: this is the same call as {which}, which made its change; no file has changed since.", args,
                        repeat=repeat, fold=True)
                self._emit(run_id, st, "note", {"content": "That change is made. Call finish now with what you changed.",
                                                "final": "The model repeated a change it had made"}, on_event)  # fmt: skip
                return
            out = (f"not run: this is the same call as {which}, and no file has changed since: it would only repeat "
                   f"that result. Use that result: call another tool, or finish with your answer.")  # fmt: skip
            # Its tool is barred for a step. A longkv server can close the tool (allowed_tools): the call and this note
            # leave the context and the step is asked again, so the model neither reads nor copies the note. Elsewhere
            # the note stays.
            not_run(out, args, repeat=repeat, **({"fold": True} if self.longkv else {}))
            return
        assert tool is not None
        start: dict[str, Any] = {"id": call.id, "name": call.name, "arguments": args, "idempotent": tool.idempotent}
        before = None if tool.idempotent else snapshot(self.workdir, digests=True)  # a rewrite with the same bytes is no change
        if before is not None:
            start["snapshot"] = before
        self._emit(run_id, st, "tool_start", start, on_event)
        t0 = time.perf_counter()
        limit = max(500, min(st.options["observation_chars"], (self.window - st.options["reply_tokens"]) // 4))
        self.ctx.results, self.ctx.seen, self.ctx.repeats, self.ctx.limit = st.results, st.files_seen, st.repeats, limit
        try:
            output, error = tool.call(self.ctx, args), False
        except ToolError as exc:
            output, error = f"error: {exc}", True
        except Exception as exc:  # a tool's own bug: the model hears of it, the run goes on
            output, error = f"error: {call.name} failed ({type(exc).__name__}: {exc})", True
        seconds = time.perf_counter() - t0
        diff = changes(before, snapshot(self.workdir), self.workdir) if before is not None else []
        # files the call changed that were there before it (a file tool's new file counts: it is the change asked for)
        edited = len(diff) if call.name not in ("bash", "python") else sum(not d.endswith(" (new)") for d in diff)
        self._emit(run_id, st, "tool_result", {**base, "arguments": args, "output": output, "context": bound(output, limit),
                                               "error": error, "changed": len(diff), "edited": edited,
                                               "seconds": round(seconds, 4)}, on_event)  # fmt: skip
        if call.name == "finish" and not error:
            self._emit(run_id, st, "end", {"status": "stopped" if st.final_request else "finished", "answer": output,
                                           "reason": st.final_request or "finish"}, on_event)  # fmt: skip

    def _check_loop(self, run_id: str, st: RunState, on_event: Callable[[Event], None] | None) -> None:
        found = find_loop(st.history)
        since = spread_error(st.history) if found is None else None
        if found is None and since is None:
            return
        period, reps = found or (1, 1)
        c = st.history[-1]
        steps = sorted({t.step for t in st.turns if t.live and not t.folded and any(m["role"] == "tool" for m in t.messages)})
        steps = steps[-(since if since is not None else period * (reps - 1)):]  # the first round (or error) stays in view
        if since is not None:
            kind, what = "error", "got the same error three times, with other calls between"
        elif period > 1:
            kind = "cycle"
            calls = ", ".join(sig[:60] for sig, _, _ in st.history[-period:])
            what = f"went round the same {period} calls twice ({calls}), each with the same outcome as before"
        elif len({sig for sig, _, _ in st.history[-3:]}) > 1:  # errors of other calls (outcome: the error's text)
            kind, what = "error", "got the same error three times"
        else:
            kind, what = "call", f"called {c[0][:200]} three times with the same result"
        planning = period == 1 and c[0].startswith("plan(")
        replan = "plan" in self.toolbox and not st.planless
        if planning:  # re-planning is the loop: push to act instead
            hint = f"You {what}. The plan is set: now carry out its first step that is not done, with bash, read_file or another tool."
        else:
            hint = (f"You {what}. Repeating it will not help. Step back: "
                    f"{'update the plan with plan, then ' if replan else ''}"
                    f"try a different approach (another tool, other arguments, or check your assumptions).")  # fmt: skip
        self._emit(run_id, st, "loop", {"kind": kind, "signature": c[0], "drop_steps": steps, "hot": 3,
                                        "replan": not planning and replan}, on_event)  # fmt: skip
        self._emit(run_id, st, "note", {"content": hint, "source": "loop"}, on_event)


def _string_argument(arguments: str, key: str) -> str | None:
    """The string argument ``key`` of a call's JSON arguments, or None (no such string, or not JSON)."""
    try:
        value = json.loads(arguments).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
