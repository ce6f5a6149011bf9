"""A run's state, rebuilt from its events alone, and the messages it sends the model.

:class:`RunState` folds the events of :mod:`longkv.agent.runlog` in order
(:meth:`RunState.apply`); the loop in :mod:`longkv.agent.agent` only ever
appends an event and applies it, so a resumed run has exactly the state the
interrupted one had. The context is laid out for the prefix cache:

``[system, task, plan?, turn, turn, ...]``

The system prompt and the task never change; the plan sits right after them and
changes only when the model calls ``plan``; each turn (an assistant message with
its tool results, or a note) is appended and never edited. In a run with
``recall`` on, every tool result starts with ``[result N]`` (its number in the
run) so that the ``recall`` tool can put it back whole once its KV was
compressed or its turn left the context. Turns leave the
context in two ways only: oldest first when the window fills (a whole turn at a
time, so a tool call is never separated from its result), or a detected loop's
repeats. Either way the run log keeps them whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from longkv.agent.runlog import Event

# after the plan: a small model reads the last line it sees, and without this one it ran the plan's last step
# ("verify with pytest") first
PLAN_NEXT = "Carry it out from step 1, one step at a time."


@dataclass
class Turn:
    """What one step added to the context: an assistant message and its tool results, or a user note."""

    step: int
    messages: list[dict[str, Any]]
    live: bool = True  # still in the context
    folded: bool = False  # a plan call whose plan now sits in the front: left out, with no marker
    calls: list[dict[str, Any]] = field(default_factory=list)  # the reply's calls: {id, name, arguments}


@dataclass
class Pending:
    """A tool call of the last reply that has no result yet (``started``: its tool_start is logged)."""

    id: str
    name: str
    arguments: str
    started: dict[str, Any] | None = None


@dataclass
class RunState:
    """Everything the loop decides from (see the module docstring)."""

    task: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    system: str = ""
    files: str = ""  # the workdir's listing at the start, after the task (workdir.listing)
    plan: str = ""
    turns: list[Turn] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    steps: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    idle_streak: int = 0  # replies in a row with no call and no answer (empty, or cut off at the token limit)
    history: list[tuple[str, str, bool]] = field(default_factory=list)  # (call signature, result hash, is error)
    hot: int = 0  # requests left at the raised temperature after a loop
    replan: bool = False  # the next request must call plan
    final_request: str | None = None  # a cap was reached: the next request asks for the final answer
    final_asked: bool = False  # that request was made
    inbox: str | None = None  # a user message given to resume, added once the pending calls have results
    observed: list[tuple[int, int]] = field(default_factory=list)  # (request bytes, prompt tokens the server counted)
    status: str = "running"
    answer: str | None = None
    reason: str | None = None
    last_request_bytes: int = 0
    last_choice: Any = None  # tool_choice of the last request
    results: list[tuple[str, str]] = field(default_factory=list)  # (call signature, text in the context) per tool result ([result n] is n - 1)
    cut_answer: str | None = None  # the answer of a finish call the last reply was cut off in (its start)
    files_seen: set[str] = field(default_factory=set)  # path arguments of read_file/write_file/edit_file calls that worked
    repeats: dict[int, int] = field(default_factory=dict)  # result number of a call not run again -> the result it repeats
    interrupted: set[int] = field(default_factory=set)  # result numbers of calls cut off by a crash (a repeat of one runs)
    wrote: set[int] = field(default_factory=set)  # result numbers of calls that changed a workdir file
    edited: set[int] = field(default_factory=set)  # of those, calls that changed a file there before them, or file tools'
    planless: bool = False  # a plan call was not a list of steps: the run goes on without a plan
    tools: list[str] = field(default_factory=list)  # the tools the run was started with, by name
    barred: set[str] = field(default_factory=set)  # tools the next request may not call: their calls since the last one that ran only repeated earlier ones

    def goes_on(self, message: str | None, max_steps: int | None) -> bool:
        """Whether a resume has anything to do: the run has not ended, or a message is given, or a new step cap
        after the run stopped at its cap."""
        capped = self.reason is not None and self.reason.startswith("The step limit")
        return self.status == "running" or bool(message) or (max_steps is not None and capped)

    @classmethod
    def replay(cls, events: list[Event]) -> RunState:
        st = cls()
        for e in events:
            st.apply(e)
        return st

    # ------------------------------------------------------------------ folding events

    def apply(self, e: Event) -> None:
        d = e.data
        k = e.kind
        if k == "start":
            self.task, self.options, self.system = d["task"], d["options"], d["system"]
            self.files = d.get("files", "")
            self.tools = list(d.get("tools", []))
        elif k == "resume":
            self.status, self.answer, self.reason = "running", None, None
            self.final_request, self.final_asked = None, False
            self.inbox = d.get("message") or None
            if d.get("max_steps"):
                self.options = {**self.options, "max_steps": int(d["max_steps"])}
        elif k == "request":
            self.last_request_bytes = int(d.get("bytes", 0))
            self.last_choice = d.get("tool_choice")
            for t in self.turns:
                if t.live and t.step in d.get("drop_steps", []):
                    t.live = False
            if self.hot:
                self.hot -= 1
            self.replan = False
            self.final_asked = self.final_request is not None
        elif k == "reply":
            self.steps += 1
            cut = d.get("truncated") or {}
            self.cut_answer = partial_string(cut.get("text") or "", "answer") if cut.get("name") == "finish" else None
            u = d["usage"]
            self.prompt_tokens += u["prompt"]
            self.cached_tokens += u["cached"]
            self.completion_tokens += u["completion"]
            self.seconds += d["seconds"]
            if u["prompt"] and self.last_request_bytes:
                self.observed.append((self.last_request_bytes, u["prompt"]))
            calls = d["tool_calls"]
            msg: dict[str, Any] = {"role": "assistant", "content": d["content"] or None}
            if calls:
                msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            self.turns.append(Turn(self.steps, [msg], calls=list(calls)))
            self.pending = [Pending(c["id"], c["name"], c["arguments"]) for c in calls]
            idle = not calls and (not d["content"].strip() or d.get("finish_reason") == "length")
            self.idle_streak = self.idle_streak + 1 if idle else 0
        elif k == "tool_start":
            for p in self.pending:
                if p.id == d["id"]:
                    p.started = d
        elif k == "tool_result":
            self.pending = [p for p in self.pending if p.id != d["id"]]
            self.seconds += d.get("seconds", 0.0)
            turn = next((t for t in reversed(self.turns) if any(c["id"] == d["id"] for c in t.calls)), self.turns[-1])
            repeat = d.get("repeat")
            seen = self.results[repeat - 1][1] if repeat else d["context"]  # a repeat counts as its original's result
            self.results.append((d["signature"], d["context"]))
            if repeat:
                self.repeats[len(self.results)] = repeat
                self.barred.add(d["name"])
                if d.get("fold") and len(turn.calls) == 1:  # the call and its note leave the context: the step is asked again
                    turn.folded = True
            else:
                self.barred.clear()
            if d.get("interrupted"):
                self.interrupted.add(len(self.results))
            if d.get("changed", 1):  # a log from before this field: the call may have written
                self.wrote.add(len(self.results))
            if d.get("edited", d.get("changed", 1)):
                self.edited.add(len(self.results))
            if d["name"] in SEES_FILES and not d["error"] and isinstance(d["arguments"].get("path"), str):
                self.files_seen.add(d["arguments"]["path"])
            content = f"{result_header(len(self.results))}{d['context']}" if self.options.get("recall") else d["context"]
            turn.messages.append({"role": "tool", "tool_call_id": d["id"], "content": content})
            if d["name"] == "plan" and not d["error"]:
                self.plan = d["arguments"].get("plan", self.plan)
                if len(turn.calls) == 1:  # the plan is shown in the front: the call itself would only be copied
                    turn.folded = True
            if d.get("planless"):
                self.planless = True
                if len(turn.calls) == 1:  # the call and its refusal leave the context: as if no plan had been asked for
                    turn.folded = True
            self.history.append((d["signature"], hashlib.sha1(seen.encode()).hexdigest(), d["error"]))
        elif k == "note":
            self.turns.append(Turn(self.steps, [{"role": "user", "content": d["content"]}]))
            if d.get("plan"):  # a plan cut off at the token limit: its whole lines
                self.plan = d["plan"]
            if d.get("planless"):
                self.planless = True
            if d.get("source") == "user":
                self.inbox = None
            if d.get("final"):
                self.final_request = d["final"]
        elif k == "loop":
            for t in self.turns:
                if t.step in d["drop_steps"]:
                    t.live = False
            self.history.clear()
            self.hot = int(d.get("hot", 3))
            self.replan = bool(d.get("replan", True))
        elif k == "end":
            self.status, self.answer, self.reason = d["status"], d.get("answer"), d.get("reason")
            self.pending = []

    def repeat_of(self, sig: str) -> int | None:
        """The number of the earlier result a call with signature ``sig`` would only repeat, or None.

        A call repeats the last result's call when it is the same call (nothing ran between them), or the one
        before the last when neither that call nor the one between changed a file (the same call on the same
        files). A repeat of a repeat names the first result; a call cut off by a crash may be made again."""
        n = len(self.results)
        hit = None
        if n and self.results[-1][0] == sig:
            hit = n
        elif n >= 2 and self.results[-2][0] == sig and not {n - 1, n} & self.wrote:
            hit = n - 1
        return self.repeats.get(hit, hit) if hit and hit not in self.interrupted else None

    def recallable(self) -> bool:
        """Whether ``recall`` has anything to put back: a result before the newest (which is in view whole) that is
        not a plan, a recall or a call not run again."""
        return any(not s.startswith(("plan(", "recall(")) and i not in self.repeats for i, (s, _) in enumerate(self.results[:-1], 1))

    # ------------------------------------------------------------------ the context

    def front(self) -> list[dict[str, Any]]:
        """The fixed head of every request: system prompt, task, and the plan when there is one."""
        task = f"{self.task}\n\n{self.files}" if self.files else self.task
        msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": task}]
        if self.plan:
            msgs.append({"role": "user", "content": f"Your current plan:\n{self.plan}\n{PLAN_NEXT}"})
        return msgs

    def messages(self, marker: bool = True) -> list[dict[str, Any]]:
        """The request's messages: the front, a marker where turns were dropped (unless ``marker`` is False: a
        KV memory session cuts the dropped turns out of its KV only when nothing takes their place), then the
        live turns in order."""
        msgs = self.front()
        gap = False
        for t in self.turns:
            if t.folded:
                continue
            if not t.live:
                gap = True
                continue
            if gap and marker:
                msgs.append({"role": "user", "content": "[Earlier steps are not shown here; their results are in the run log.]"})
                gap = False
            msgs.extend(t.messages)
        return msgs


    def estimate(self, nbytes: int) -> int:
        """An upper estimate of the prompt tokens of a request of ``nbytes`` (:func:`message_bytes`).

        Anchored on the last prompt the server counted: bytes added since cost at most the largest tokens per byte
        seen between two requests (1 until two were seen: a byte-level tokenizer makes at most one token of a byte),
        bytes removed save at least 0.8x the smallest. Before any count: one token per byte.
        """
        if not self.observed:
            return nbytes
        rates = [(p1 - p0) / (b1 - b0) for (b0, p0), (b1, p1) in zip(self.observed, self.observed[1:], strict=False) if b1 - b0 > 64]
        high = min(1.0, max(rates)) if rates else 1.0
        low = max(0.0, 0.8 * min(rates)) if rates else 0.0
        b, p = self.observed[-1]
        delta = nbytes - b
        return int(p + (high * delta if delta > 0 else low * delta)) + 16


SEES_FILES = ("read_file", "write_file", "edit_file")  # tools whose file write_file may then replace (ToolContext.seen)


_LAX = json.JSONDecoder(strict=False)  # a raw newline inside a string is read, not refused


def partial_string(raw: str, key: str) -> str | None:
    """The string argument ``key`` of a tool call cut off at the token limit (``raw``: the call's text so far), as
    far as it got, or None when the cut came before it began."""
    m = re.search(rf'"{re.escape(key)}"\s*:\s*"', raw)
    if m is None:
        return None
    body = raw[m.end() :]
    with contextlib.suppress(ValueError):
        return str(_LAX.raw_decode('"' + body)[0]).strip()  # the string ended, the call did not
    for trim in range(7):  # the string was cut, maybe inside an escape such as \u00e9
        with contextlib.suppress(ValueError):
            return str(_LAX.decode('"' + body[: len(body) - trim] + '"')).strip()
    return None


def result_header(n: int) -> str:
    """The first line of the ``n``-th tool result of a run with recall on (what ``recall(n)`` refers to)."""
    return f"[result {n}]\n"


def signature(name: str, arguments: str) -> str:
    """A call's identity for loop detection: the tool and its arguments with keys sorted."""
    try:
        args = json.dumps(json.loads(arguments), sort_keys=True)
    except (json.JSONDecodeError, TypeError):
        args = arguments
    return f"{name}({args})"


def message_bytes(messages: list[dict[str, Any]]) -> int:
    """UTF-8 bytes of the messages as JSON: with the prompt tokens the server counts, the calibration of a bound."""
    return len(json.dumps(messages, ensure_ascii=False).encode())
