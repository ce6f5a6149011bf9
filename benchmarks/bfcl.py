"""BFCL function-calling accuracy and speed of any OpenAI-compatible chat server (longkv, llama-server, ...).

What it measures, per BFCL category: how often the model's OpenAI ``tool_calls`` are right according to the
Berkeley Function Calling Leaderboard's own checkers, how often they are well formed at all, and how fast the
server answers.

* entries: test entries run (the first ``--limit`` of each category's file).
* parse: share of entries whose tool calls all carried a known function name and a JSON object as arguments
  (and there was at least one call); in irrelevance categories a plain-text answer also counts as parsed; in
  multi-turn ones every call of every step must be well formed (plain-text steps are allowed).
* acc: BFCL's verdict. simple/multiple/parallel/parallel_multiple: the AST checker on the decoded calls;
  irrelevance: no call made; multi_turn_base: the calls are executed against BFCL's simulated APIs (file system,
  trading bot, ...) turn by turn, results fed back as ``tool`` messages, until the model stops calling (at most
  BFCL's MAXIMUM_STEP_LIMIT steps per turn), then BFCL's multi-turn checker compares state and results with the
  ground-truth run.
* tok/s: completion_tokens / wall time of the requests (prefill included), per entry, mean and median; a
  server's own timings (llama-server's ``timings``) stay in the raw responses of the output JSON.
* s/entry: mean wall time of an entry (all its requests). The tool prompt of a multi_turn_base entry is ~5k
  tokens before the first answer and grows with each step: give the server a context of 16k or more, or those
  entries fail with HTTP 400. On 2 cores with Qwen2.5-Coder-0.5B under llama-server a single-turn entry takes
  ~3-4 s and a multi-turn one ~40-70 s, so all six default categories (1,440 entries) take about 4-5 hours.

Data, possible answers, the function-doc to tool conversion (the same as BFCL's OpenAI FC handler: "." in names
becomes "_", BFCL types "dict"/"float"/"tuple"/"any" become JSON Schema types) and the checkers all come from the
``bfcl-eval`` package (BFCL: Patil et al., "The Berkeley Function Calling Leaderboard", gorilla.cs.berkeley.edu);
nothing of BFCL is copied here. Install it without its vendor SDKs, plus the few modules its checker imports::

    .venv/bin/pip install bfcl-eval --no-deps
    .venv/bin/pip install tenacity mpmath filelock tree_sitter==0.21.3 tree-sitter-java==0.21.0 \\
        tree-sitter-javascript==0.21.4

Run it (one server at a time on a small machine)::

    longkv serve MODEL.gguf --port 8000 &
    python benchmarks/bfcl.py --base-url http://127.0.0.1:8000/v1 --label longkv --out runs/bfcl-longkv.json
    python benchmarks/bfcl.py --base-url http://127.0.0.1:8000/v1 --label longkv-nogrammar \\
        --extra-body '{"longkv": {"grammar": false}}' --out runs/bfcl-longkv-nogrammar.json
    # the competitor: llama.cpp's server with the GGUF's own chat template (tools need --jinja)
    llama-server -m MODEL.gguf --jinja --port 8091 -t 2 -c 8192 &
    python benchmarks/bfcl.py --base-url http://127.0.0.1:8091/v1 --label llama.cpp --limit 20 --out runs/bfcl-llama.json
    python benchmarks/bfcl.py --compare runs/bfcl-longkv.json runs/bfcl-longkv-nogrammar.json runs/bfcl-llama.json

Sandbox: BFCL's multi-turn execution ``eval()``s strings built from the model's calls, so every BFCL checker and
execution call runs in a separate Python worker process (this file with ``--_worker``), fed JSON lines on stdin,
started in a fresh temporary directory (its cwd, HOME and BFCL_PROJECT_ROOT) with no proxy variables or API keys
in its environment, an 8 GiB address-space limit, a per-call timeout (``--exec-timeout``; a worker that runs past
it is killed and the entry fails), and, where ``unshare -n`` (or ``unshare -rn``) works, in its own network
namespace with no network at all. The sandbox used is recorded in the output JSON. This is isolation against
accidents, not a security boundary against a hostile model.

Server errors (HTTP 400 for a prompt over the context, 500, timeouts) are recorded per entry as failures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_CATEGORIES = "simple,multiple,parallel,parallel_multiple,irrelevance,multi_turn_base"
ALIASES = {"simple": "simple_python", "java": "simple_java", "javascript": "simple_javascript"}
UNSUPPORTED = ("web_search", "memory", "format_sensitivity")  # need live web or memory backends
MODEL_KEY = "openai-compatible-FC"  # the name BFCL's checkers see; its tool names had "." replaced by "_"


# ---------------------------------------------------------------------------------------------- sandboxed worker
def _worker_main() -> None:
    """Run BFCL's checkers and simulated APIs on requests read as JSON lines from stdin."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything BFCL prints goes to the log, not into the protocol
    sys.stdout = sys.stderr
    import types

    # ast_checker imports MODEL_CONFIG_MAPPING only to ask whether the model's tool names had "." replaced by "_";
    # the real module imports every vendor SDK's handler, so it is replaced by a one-entry stand-in.
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = {MODEL_KEY: types.SimpleNamespace(underscore_to_dot=True)}  # type: ignore[attr-defined]
    sys.modules["bfcl_eval.constants.model_config"] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call
    from bfcl_eval.utils import is_function_calling_format_output, is_java, is_js

    def ast(req: dict[str, Any]) -> dict[str, Any]:
        if not is_function_calling_format_output(req["decoded"]):
            return {"valid": False, "error": ["Did not output in the specified format."], "error_type": "ast_decoder"}
        cat = req["category"]
        lang = Language.JAVA if is_java(cat) else Language.JAVASCRIPT if is_js(cat) else Language.PYTHON
        return ast_checker(req["function"], req["decoded"], req["answer"], lang, cat, MODEL_KEY)

    def execute(req: dict[str, Any]) -> dict[str, Any]:
        results, _ = execute_multi_turn_func_call(
            req["calls"], req["initial_config"], req["involved_classes"], MODEL_KEY, req["id"],
            long_context="long_context" in req["id"], is_evaL_run=False,
        )
        return {"results": results}

    def multi_turn(req: dict[str, Any]) -> dict[str, Any]:
        return multi_turn_checker(req["decoded"], req["answer"], req["entry"], req["category"], MODEL_KEY)

    ops = {"ast": ast, "execute": execute, "multi_turn": multi_turn}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = ops[req["op"]](req)
        except Exception as e:
            res = {"valid": False, "error": [f"checker raised {type(e).__name__}: {e}"], "error_type": "checker_crash"}
        out.write(json.dumps(res, default=str) + "\n")


class Sandbox:
    """The worker process: started lazily, restarted after a crash or a timeout."""

    def __init__(self, timeout: float, tmp: Path) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="sandbox-", dir=tmp))
        self.prefix = self._isolation()
        self.kind = " ".join(["unshare", *self.prefix[1:]]) if self.prefix else "none (no working unshare)"

    @staticmethod
    def _isolation() -> list[str]:
        exe = shutil.which("unshare")
        for flags in (["-n"], ["-r", "-n"]):
            if exe and subprocess.run([exe, *flags, "true"], capture_output=True).returncode == 0:
                return [exe, *flags]
        return []

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.endswith(("_KEY", "_TOKEN"))}
        env.update(HOME=str(self.dir), BFCL_PROJECT_ROOT=str(self.dir), PYTHONDONTWRITEBYTECODE="1")

        def limits() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

        self.log = open(self.dir / "worker.log", "a")  # noqa: SIM115
        cmd = [*self.prefix, sys.executable, str(Path(__file__).resolve()), "--_worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, cwd=self.dir, env=env, preexec_fn=limits)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def call(self, **req: Any) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req, default=str) + "\n")
            self.proc.stdin.flush()
            timed_out = not select.select([self.proc.stdout], [], [], self.timeout)[0]
            line = "" if timed_out else self.proc.stdout.readline()
        except BrokenPipeError:
            line, timed_out = "", False
        if line:
            return json.loads(line)
        self.close()
        why = f"timed out after {self.timeout:.0f} s" if timed_out else "died: " + (self.dir / "worker.log").read_text()[-500:]
        return {"valid": False, "error": [f"sandbox worker {why}"], "error_type": "sandbox"}


# ---------------------------------------------------------------------------------------------- the client side
def _request(client: Any, args: argparse.Namespace, messages: list[dict], tools: list[dict]) -> tuple[Any, float, str]:
    """One chat completion: (response or None, wall seconds, error message or "")."""
    kwargs: dict[str, Any] = {"model": args.model, "messages": messages, "temperature": args.temperature}
    if tools:
        kwargs |= {"tools": tools, "tool_choice": "auto"}
    if args.max_tokens:
        kwargs["max_tokens"] = args.max_tokens
    if args.extra_body:
        kwargs["extra_body"] = args.extra_body
    t0 = time.perf_counter()
    try:
        resp = client.chat.completions.create(**kwargs)
        if not resp.choices:
            raise ValueError("response has no choices")
        return resp, time.perf_counter() - t0, ""
    except Exception as e:  # openai.APIStatusError (400, 500, ...), timeouts, connection errors, bad bodies
        status = getattr(e, "status_code", None)
        return None, time.perf_counter() - t0, (f"HTTP {status}: " if status else f"{type(e).__name__}: ") + str(e)[:500]


def _calls(message: Any, known: set[str]) -> tuple[list[dict[str, Any]] | None, bool]:
    """BFCL's decoded form [{name: {arg: value}}] of the tool calls (None: an argument string is not JSON,
    which BFCL counts as a decode failure) and whether every call names a known tool with a JSON object."""
    decoded: list[dict[str, Any]] | None = []
    well_formed = True
    for tc in message.tool_calls or []:
        try:
            params = json.loads(tc.function.arguments)
        except (json.JSONDecodeError, TypeError):
            decoded, well_formed = None, False
            continue
        well_formed &= tc.function.name in known and isinstance(params, dict)
        if decoded is not None:
            decoded.append({tc.function.name: params})
    return decoded, well_formed


def _raw(resp: Any) -> dict[str, Any]:
    return resp.model_dump(exclude_none=True, exclude={"id", "created", "object", "system_fingerprint"})


class Runner:
    def __init__(self, args: argparse.Namespace, client: Any, sandbox: Sandbox) -> None:
        from bfcl_eval.constants.enums import ModelStyle
        from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
        from bfcl_eval.model_handler.utils import convert_to_tool

        self.args, self.client, self.sandbox = args, client, sandbox
        self._convert = lambda functions: convert_to_tool(functions, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)

    def tools(self, functions: list[dict]) -> list[dict]:
        """BFCL's function docs as OpenAI tools, converted by BFCL's own OpenAI FC code."""
        return self._convert(functions)

    def _record(self, entry: dict, cat: str) -> dict[str, Any]:
        return {"id": entry["id"], "category": cat, "valid": False, "parse_ok": False, "error": [], "error_type": "",
                "requests": 0, "completion_tokens": 0, "prompt_tokens": 0, "request_s": 0.0, "raw": []}

    def _ask(self, rec: dict[str, Any], messages: list[dict], tools: list[dict]) -> Any:
        resp, wall, err = _request(self.client, self.args, messages, tools)
        rec["requests"] += 1
        rec["request_s"] += wall
        if resp is None:
            rec["error"], rec["error_type"] = [err], "server_error"
            rec["raw"].append({"error": err})
            return None
        if resp.usage is not None:
            rec["completion_tokens"] += resp.usage.completion_tokens or 0
            rec["prompt_tokens"] += resp.usage.prompt_tokens or 0
        rec["raw"].append(_raw(resp))
        return resp.choices[0].message

    def single_turn(self, entry: dict, answer: dict | None, cat: str) -> dict[str, Any]:
        rec = self._record(entry, cat)
        tools = self.tools(entry["function"])
        msg = self._ask(rec, list(entry["question"][0]), tools)
        if msg is None:
            return rec
        decoded, well_formed = _calls(msg, {t["function"]["name"] for t in tools})
        if "relevance" in cat:  # BFCL: a call "was made" when the calls decode and are not empty
            from bfcl_eval.utils import is_empty_output

            made = decoded is not None and not is_empty_output(decoded)
            rec["valid"] = made != ("irrelevance" in cat)
            rec["parse_ok"] = well_formed and (made or "irrelevance" in cat)
            if not rec["valid"]:
                rec["error_type"] = "irrelevance_error:decoder_success" if made else "relevance_error:decoder_failed"
                rec["error"] = ["Valid syntax. Successfully decoded a call when it should not."] if made else [
                    "Failed to decode a call when it should have."]
            return rec
        rec["parse_ok"] = well_formed and bool(decoded)
        if not decoded:
            why = "no tool call" if decoded == [] else "tool call arguments are not JSON"
            rec["error"], rec["error_type"] = [f"Invalid syntax. Failed to decode AST ({why})."], "ast_decoder"
            return rec
        assert answer is not None
        res = self.sandbox.call(op="ast", function=entry["function"], decoded=decoded,
                                answer=answer["ground_truth"], category=cat)
        rec["valid"], rec["error"], rec["error_type"] = res["valid"], res.get("error", []), res.get("error_type", "")
        return rec

    def multi_turn(self, entry: dict, answer: dict, cat: str) -> dict[str, Any]:
        from bfcl_eval.constants.default_prompts import (
            DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC,
            MAXIMUM_STEP_LIMIT,
        )
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import is_empty_execute_response
        from bfcl_eval.model_handler.utils import convert_to_function_call

        rec = self._record(entry, cat)
        functions, holdout = list(entry["function"]), entry.get("missed_function", {})
        tools = self.tools(functions)
        known = {t["function"]["name"] for t in tools}
        messages: list[dict] = []
        decoded_turns: list[list[list[str]]] = []
        n_calls, all_ok, failed, forced = 0, True, False, False
        for turn, turn_messages in enumerate(entry["question"]):
            if str(turn) in holdout:  # miss_func categories: the held-out functions arrive with this turn
                functions += holdout[str(turn)]
                tools = self.tools(functions)
                known = {t["function"]["name"] for t in tools}
                turn_messages = [{"role": "user", "content": DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC}]
            messages.extend(turn_messages)
            steps: list[list[str]] = []
            step = 0
            while True:
                msg = self._ask(rec, messages, tools)
                if msg is None:
                    failed = True
                    break
                tool_calls = msg.tool_calls or []
                ids = [tc.id or f"call_{turn}_{step}_{i}" for i, tc in enumerate(tool_calls)]
                messages.append({"role": "assistant", "content": msg.content or ""} | ({"tool_calls": [
                    {"id": i, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                    for i, tc in zip(ids, tool_calls, strict=True)]} if tool_calls else {}))
                _, ok = _calls(msg, known)
                all_ok &= ok
                n_calls += len(tool_calls)
                try:  # BFCL's decode_execute: plain text or a non-JSON argument string ends the turn
                    calls = convert_to_function_call([{tc.function.name: tc.function.arguments} for tc in tool_calls])
                except Exception:
                    break
                if is_empty_execute_response(calls):
                    break
                steps.append(calls)
                res = self.sandbox.call(op="execute", calls=calls, initial_config=entry.get("initial_config", {}),
                                        involved_classes=entry["involved_classes"], id=entry["id"])
                if "results" not in res:
                    rec["error"], rec["error_type"], failed = res.get("error", []), res.get("error_type", "sandbox"), True
                    break
                messages += [{"role": "tool", "content": str(r), "tool_call_id": i}
                             for r, i in zip(res["results"], ids, strict=False)]
                step += 1
                if step > MAXIMUM_STEP_LIMIT:  # BFCL: forced to quit; the remaining turns are not run
                    forced = True
                    break
            decoded_turns.append(steps)
            if failed or forced:
                break
        rec["parse_ok"] = all_ok and n_calls > 0
        if failed:
            return rec
        if len(decoded_turns) != len(answer["ground_truth"]):
            rec["error"] = [f"Model was force-terminated after {MAXIMUM_STEP_LIMIT} steps in turn {len(decoded_turns) - 1}."]
            rec["error_type"] = "multi_turn:force_terminated"
            return rec
        entry_for_checker = {k: v for k, v in entry.items() if k not in ("function", "missed_function")}
        res = self.sandbox.call(op="multi_turn", decoded=decoded_turns, answer=answer["ground_truth"],
                                entry=entry_for_checker, category=cat)
        rec["valid"], rec["error_type"] = res["valid"], res.get("error_type", "")
        rec["error"] = res.get("error") or ([res["error_message"]] if "error_message" in res else [])
        if not rec["valid"] and "details" in res:
            rec["checker_details"] = res["details"]
        return rec


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    tok_s = [r["completion_tokens"] / r["request_s"] for r in records if r["request_s"] > 0 and r["completion_tokens"]]
    return {
        "entries": n,
        "parse_rate": sum(r["parse_ok"] for r in records) / n if n else 0.0,
        "accuracy": sum(r["valid"] for r in records) / n if n else 0.0,
        "tok_s_mean": statistics.fmean(tok_s) if tok_s else 0.0,
        "tok_s_median": statistics.median(tok_s) if tok_s else 0.0,
        "s_per_entry": statistics.fmean(r["wall_s"] for r in records) if n else 0.0,
        "requests_per_entry": statistics.fmean(r["requests"] for r in records) if n else 0.0,
        "server_errors": sum(r["error_type"] == "server_error" for r in records),
    }


def print_summaries(runs: list[tuple[str, dict[str, dict[str, Any]]]]) -> None:
    """A section per category (and one for the unweighted mean over categories), a row per run in it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="BFCL: accuracy by BFCL's own checkers")
    for col in ("category", "run", "n", "acc", "parse", "tok/s", "tok/s med", "s/entry", "http err"):
        table.add_column(col, justify="left" if col in ("category", "run") else "right", no_wrap=True)
    cats = list(dict.fromkeys(c for _, s in runs for c in s))
    for cat in [*cats, "mean"]:
        for i, (label, summary) in enumerate(runs):
            rows = list(summary.values()) if cat == "mean" else [summary[cat]] if cat in summary else []
            if not rows:
                continue
            m = {k: statistics.fmean(r[k] for r in rows) for k in ("accuracy", "parse_rate", "tok_s_mean",
                                                                    "tok_s_median", "s_per_entry")}
            table.add_row(cat if i == 0 else "", label, str(sum(r["entries"] for r in rows)), f"{m['accuracy']:.1%}",
                          f"{m['parse_rate']:.0%}", f"{m['tok_s_mean']:.1f}", f"{m['tok_s_median']:.1f}",
                          f"{m['s_per_entry']:.1f}", str(sum(r["server_errors"] for r in rows)),
                          end_section=i == len(runs) - 1)
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)  # piped: don't squeeze to 80 columns


def run(args: argparse.Namespace, tmp: Path) -> None:
    from openai import OpenAI
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=args.timeout,
                    max_retries=0)
    if not args.model:
        args.model = client.models.list().data[0].id
    from bfcl_eval.utils import load_dataset_entry, load_ground_truth_entry

    cats = [ALIASES.get(c.strip(), c.strip()) for c in args.categories.split(",") if c.strip()]
    for cat in cats:
        if cat.startswith(UNSUPPORTED):
            raise SystemExit(f"category {cat} is not supported here (it needs web search or memory backends)")
    work = []
    for cat in cats:
        limit = args.multi_turn_limit if "multi_turn" in cat and args.multi_turn_limit is not None else args.limit
        entries = load_dataset_entry(cat)[:limit]
        answers = {} if "relevance" in cat else {a["id"]: a for a in load_ground_truth_entry(cat)}
        work.append((cat, entries, answers))
    sandbox = Sandbox(args.exec_timeout, tmp)
    runner = Runner(args, client, sandbox)
    label = args.label or Path(args.model).stem
    result: dict[str, Any] = {
        "label": label, "base_url": args.base_url, "model": args.model, "extra_body": args.extra_body,
        "temperature": args.temperature, "max_tokens": args.max_tokens, "limit": args.limit, "multi_turn_limit": args.multi_turn_limit,
        "bfcl_eval_version": metadata.version("bfcl-eval"), "sandbox": sandbox.kind,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": {}, "entries": [],
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("acc {task.fields[acc]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    by_cat: dict[str, list[dict[str, Any]]] = {cat: [] for cat, _, _ in work}
    try:
        with Progress(*columns) as progress:
            tasks = {cat: progress.add_task(cat, total=len(e), acc="-") for cat, e, _ in work}
            for cat, entries, answers in work:
                for entry in entries:
                    t0 = time.perf_counter()
                    try:
                        if "multi_turn" in cat:
                            rec = runner.multi_turn(entry, answers[entry["id"]], cat)
                        else:
                            rec = runner.single_turn(entry, answers.get(entry["id"]), cat)
                    except Exception as e:  # a broken entry (e.g. a function doc the converter rejects) fails alone
                        rec = runner._record(entry, cat) | {"error": [f"{type(e).__name__}: {e}"], "error_type": "runner"}
                    rec["wall_s"] = time.perf_counter() - t0
                    by_cat[cat].append(rec)
                    result["entries"].append(rec)
                    acc = sum(r["valid"] for r in by_cat[cat]) / len(by_cat[cat])
                    progress.update(tasks[cat], advance=1, acc=f"{acc:.0%}")
                result["summary"][cat] = summarize(by_cat[cat])
                _write(args.out, result)
    finally:  # also after Ctrl-C or a crash: keep what was run, a cut-short category marked partial
        sandbox.close()
        for cat, recs in by_cat.items():
            if cat not in result["summary"] and recs:
                result["summary"][cat] = summarize(recs) | {"partial": True}
        _write(args.out, result)
    print_summaries([(label, result["summary"])])
    if args.out:
        print(f"wrote {args.out}")


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible server, ending in /v1")
    p.add_argument("--model", help="model id sent (default: the first one GET /v1/models lists)")
    p.add_argument("--categories", default=DEFAULT_CATEGORIES,
                   help=f"comma-separated BFCL categories ('simple' = simple_python); default {DEFAULT_CATEGORIES}")
    p.add_argument("--limit", type=int, help="run only the first N entries of each category (default: all)")
    p.add_argument("--multi-turn-limit", type=int, help="the same for multi-turn categories (default: --limit)")
    p.add_argument("--label", help="name of this run in tables and --compare (default: the model's name)")
    p.add_argument("--extra-body", type=json.loads, help="JSON object sent as extra_body with every request, "
                   """e.g. '{"longkv": {"grammar": false}}'""")
    p.add_argument("--out", type=Path, help="write the summary and per-entry records (with raw responses) here")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=512, help="per request (0: the server's default)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per HTTP request")
    p.add_argument("--exec-timeout", type=float, default=60, help="seconds per sandboxed checker/execution call")
    p.add_argument("--compare", nargs="+", type=Path, metavar="RESULT.json",
                   help="print the summaries of earlier result files side by side, run nothing")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker_main()
    elif args.compare:
        runs = [json.loads(f.read_text()) for f in args.compare]
        print_summaries([(r.get("label") or f.stem, r["summary"]) for r, f in zip(runs, args.compare, strict=True)])
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bfcl-"))
        os.environ.setdefault("BFCL_PROJECT_ROOT", str(tmp))  # bfcl_eval makes result/, score/ there on import
        try:
            run(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
