"""Markdown tables and plots from run folders: one run's ``summary.md``, or several runs merged.

Accuracy cells read ``mean (n)``; a cell whose policy refused every sample
(e.g. dense beyond the model's trained window) reads ``refused``; ``-`` marks
a cell with no rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longkv.bench import plots
from longkv.bench.runner import RunFolder
from longkv.errors import LongKVError
from longkv.loading import DEFAULT_MODEL_NAME

Row = dict[str, Any]


def _fmt_len(n: int) -> str:
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def pivot(rows: list[Row], label: Callable[[Row], str], cell: Callable[[list[Row]], str], col: str = "length") -> str:
    """A markdown table: one line per ``label(row)``, one column per value of ``col``."""
    cols = sorted({r[col] for r in rows})
    groups: dict[str, dict[Any, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[label(r)][r[col]].append(r)
    head = "| | " + " | ".join(_fmt_len(c) if col == "length" else str(c) for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name in sorted(groups):
        lines.append(f"| {name} | " + " | ".join(cell(groups[name].get(c, [])) for c in cols) + " |")
    return "\n".join(lines)


def accuracy_cell(rows: list[Row]) -> str:
    ok = [r["score"] for r in rows if r.get("status") == "ok"]
    if ok:
        return f"{sum(ok) / len(ok):.2f} ({len(ok)})"
    return "refused" if rows else "-"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def number_cell(field: str, fmt: str = "{:.0f}", scale: float = 1.0) -> Callable[[list[Row]], str]:
    """Median of ``field`` over the ok rows of a cell."""

    def cell(rows: list[Row]) -> str:
        xs = [float(r[field]) * scale for r in rows if r.get("status", "ok") == "ok" and r.get(field) is not None]
        if xs:
            return fmt.format(_median(xs))
        return "refused" if rows else "-"

    return cell


def _who(r: Row) -> str:
    backend = r.get("backend", "longkv")
    return r["policy"] if backend == "longkv" else f"{r['policy']} ({backend})"


def tables(rows: list[Row], kind: str) -> str:
    """The markdown body of a summary for rows of one kind (niah, ruler, ppl, speed)."""
    if kind in ("niah", "ruler"):
        parts = ["### Accuracy (mean score, samples) by prompt length", pivot(rows, _who, accuracy_cell)]
        if kind == "ruler":
            parts += ["### Per task", pivot(rows, lambda r: f"{_who(r)} / {r['task']}", accuracy_cell)]
        parts += [
            "### Prefill tokens/s (median)",
            pivot(rows, _who, number_cell("prefill_tok_s")),
            "### Peak KV cache (MiB, median)",
            pivot(rows, _who, number_cell("peak_kv_bytes", "{:.1f}", 1 / 2**20)),
        ]
        return "\n\n".join(parts)
    if kind == "ppl":
        return "\n\n".join(
            [
                "### Perplexity of the evaluated tokens (token by token after the prefix)",
                pivot(rows, _who, number_cell("ppl", "{:.2f}")),
                "### Peak KV cache (MiB)",
                pivot(rows, _who, number_cell("peak_kv_bytes", "{:.1f}", 1 / 2**20)),
            ]
        )
    if kind == "speed":
        return "\n\n".join(
            [
                "### Prefill tokens/s (median)",
                pivot(rows, _who, number_cell("prefill_tok_s")),
                "### Decode tokens/s (median)",
                pivot(rows, _who, number_cell("decode_tok_s", "{:.1f}")),
                "### TTFT (s, median)",
                pivot(rows, _who, number_cell("ttft_s", "{:.2f}")),
                "### KV cache (MiB): peak measured (longkv) or its size at that length (competitors)",
                pivot(rows, _who, number_cell("peak_kv_bytes", "{:.1f}", 1 / 2**20)),
            ]
        )
    raise LongKVError(f"unknown run kind {kind!r}: expected niah, ruler, ppl or speed")


def write_plots(rows: list[Row], kind: str, out_dir: Path) -> list[Path]:
    """The PNGs for rows of one kind, written into ``out_dir``."""
    out: list[Path] = []
    if not rows:
        return out
    if kind == "niah":
        for policy in sorted({r["policy"] for r in rows}):
            safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in policy)
            out.append(plots.heatmap(rows, policy, out_dir / f"heatmap_{safe}.png"))
    if kind in ("niah", "ruler"):
        scored = [{**r, "policy": _who(r)} for r in rows]
        out.append(plots.accuracy_vs_length(scored, out_dir / "accuracy_vs_length.png"))
        out.append(plots.accuracy_vs_keep_ratio(scored, out_dir / "accuracy_vs_keep_ratio.png"))
    if kind == "ppl":
        out.append(plots.line_plot(rows, "length", "ppl", out_dir / "ppl_vs_length.png", "prefix length (tokens)", "perplexity", "perplexity vs prefix length", logx=True))
    if kind == "speed":
        out.append(plots.speed_vs_length(rows, out_dir / "speed_vs_length.png"))
    return out


def _settings(cfg: dict[str, Any]) -> tuple[str, str, str]:
    """A run's model, backend (with whether it named the question to the engine) and seed, as a summary shows them."""
    backend = cfg.get("backend", "longkv")
    if backend == "longkv" and cfg.get("kind", "niah") in ("niah", "ruler"):
        backend += ", question-aware" if cfg.get("question_aware") else ", question-agnostic"
    return f"`{cfg.get('model') or DEFAULT_MODEL_NAME + ' (default)'}`", backend, str(cfg.get("seed"))


def dense_reads(rows: list[Row]) -> list[str]:
    """One line per policy whose prompts were read densely in part (block_topk on a prompt within its span):
    how many of its answered prompts, at which lengths. Its scores there are dense attention's."""
    lines = []
    for name in sorted({_who(r) for r in rows}):
        ok = [r for r in rows if _who(r) == name and r.get("status") == "ok"]
        dense = [r for r in ok if str(r.get("policy_resolved", "")).endswith("prompt read densely")]
        if dense:
            lengths = ", ".join(_fmt_len(n) for n in sorted({int(r["length"]) for r in dense}))
            lines.append(f"- `{name}` read {len(dense)} of {len(ok)} prompts densely (within its span), at {lengths}: "
                         "those cells score dense attention")  # fmt: skip
    return lines


def _commands(cfg: dict[str, Any]) -> list[str]:
    """Every command that added rows to a run folder, in order (a folder from before ``commands`` has one ``command``)."""
    return [str(c) for c in cfg.get("commands") or [cfg.get("command")] if c]


def write_summary(folder: RunFolder) -> Path:
    """Rewrite ``summary.md`` and the PNGs of one run folder from its ``results.jsonl``."""
    cfg = folder.config()
    rows = folder.rows()
    kind = cfg.get("kind", "niah")
    pngs = write_plots(rows, kind, folder.path)
    model, backend, seed = _settings(cfg)
    head = [f"# {kind} run `{folder.path.name}`", "", f"model: {model}, backend: {backend}, seed {seed}, {len(rows)} rows", ""]
    commands = _commands(cfg)
    if commands:  # every command that added rows to the folder, in order
        head += ["```", *commands, "```", ""]
    notes = dense_reads(rows)
    head += [*notes, "", ""] if notes else []
    body = tables(rows, kind) if rows else "(no results yet)"
    images = "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    path = folder.path / "summary.md"
    path.write_text("\n".join(head) + body + "\n\n" + images + "\n")
    return path


def merge(runs: list[str | Path], out: Path) -> Path:
    """Merge run folders of the same kind into one comparison (``out/summary.md`` + PNGs).

    Rows are labelled by policy and backend, and by run when there are several runs (the folder's name, or its
    path where two runs share a name); a table of the runs gives each one's model, backend, seed, rows and
    command.

    Raises:
        LongKVError: a folder that is missing or not a run, a run given twice, runs of different kinds, or
            ``out`` a run folder (its own summary would be overwritten).
    """
    paths = [Path(r) for r in runs]
    for p in paths:
        if not p.is_dir():
            raise LongKVError(f"{p} does not exist: pass run folders (runs/NAME, as the bench commands print them)")
        if not (p / "config.json").is_file():
            hint = "it holds a merged report: pass the runs it merged" if (p / "summary.md").is_file() else "pass folders under runs/"
            raise LongKVError(f"{p} is not a run folder (no config.json): {hint}")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise LongKVError(f"{p} is given twice (as {seen[p.resolve()]}): pass each run once")
        seen[p.resolve()] = p
    if (out / "config.json").is_file():
        raise LongKVError(f"--out {out} is a run folder: its summary.md and plots would be overwritten; pass a new folder")
    names = [p.name for p in paths]
    labels = [p.name if names.count(p.name) == 1 else str(p) for p in paths]
    rows: list[Row] = []
    kinds = set()
    table = ["| run | model | backend | seed | rows | command |", "|---|---|---|---|---|---|"]
    for p, label in zip(paths, labels, strict=True):
        cfg = json.loads((p / "config.json").read_text())
        kinds.add(cfg.get("kind", "niah"))
        got = RunFolder(p.parent, p.name).rows()
        for row in got:
            rows.append({**row, "policy": f"{row['policy']} ({label})" if len(paths) > 1 else row["policy"]})
        commands = [c.replace("|", "\\|") for c in _commands(cfg)]
        table.append(f"| {label} | {' | '.join(_settings(cfg))} | {len(got)} | {'<br>'.join(f'`{c}`' for c in commands)} |")
    if len(kinds) != 1:
        raise LongKVError(f"runs of different kinds ({', '.join(sorted(kinds))}) cannot be merged: pass runs of one kind")
    kind = kinds.pop()
    out.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(rows, kind, out)
    body = tables(rows, kind) if rows else "(no results)"
    notes = "".join(line + "\n" for line in dense_reads(rows))
    text = (f"# {kind}: {', '.join(labels)}\n\n" + "\n".join(table) + "\n\n" + (notes + "\n" if notes else "")
            + f"{body}\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")  # fmt: skip
    (out / "summary.md").write_text(text)
    return out / "summary.md"
