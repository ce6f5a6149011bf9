"""PNG plots of benchmark rows (matplotlib, Agg backend: no display needed).

Every function takes result rows (dicts from ``results.jsonl``) and a path and
returns the path written. Refused cells (a policy that cannot serve the
length) are drawn hatched grey, not as zero accuracy.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt_len(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def heatmap(rows: list[Row], policy: str, out: Path, title: str = "") -> Path:
    """Accuracy by needle depth (y) and prompt length (x) for one policy; refused cells hatched."""
    plt = _pyplot()
    rows = [r for r in rows if r["policy"] == policy and r.get("depth") is not None]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    refused = []
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            cell = [r for r in rows if r["depth"] == d and r["length"] == L]
            scores = [r["score"] for r in cell if r.get("status") == "ok"]
            if scores:
                grid[i][j] = _mean(scores)
            elif cell:
                refused.append((i, j))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(lengths), 2), 1.2 + 0.5 * max(len(depths), 2)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            v = grid[i][j]
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    for i, j in refused:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=True, facecolor="#dddddd", hatch="//", edgecolor="#999999"))
        ax.text(j, i, "refused", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle retrieval: {policy}", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _length_axis(ax: Any, xs: list[float]) -> None:
    """Log-scaled x axis ticked at the lengths measured, labelled 1K, 4K, ..."""
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(xs, [_fmt_len(int(v)) for v in xs])


def _series(rows: list[Row], x: str, y: str, by: str = "policy") -> dict[str, list[tuple[float, float]]]:
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status", "ok") == "ok" and r.get(y) is not None and r.get(x) is not None:
            groups[str(r[by])][float(r[x])].append(float(r[y]))
    return {k: sorted((xv, _mean(ys)) for xv, ys in v.items()) for k, v in groups.items()}


def line_plot(rows: list[Row], x: str, y: str, out: Path, xlabel: str, ylabel: str, title: str, by: str = "policy", logx: bool = False) -> Path:
    """Mean of ``y`` against ``x``, one line per value of ``by`` (refused rows left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = _series(rows, x, y, by)
    for name, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        _length_axis(ax, sorted({p[0] for pts in series.values() for p in pts}))
    if y == "score":
        ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def accuracy_vs_length(rows: list[Row], out: Path, title: str = "accuracy vs prompt length") -> Path:
    return line_plot(rows, "length", "score", out, "prompt length (tokens)", "accuracy", title, logx=True)


def by_cell_keep_ratio(rows: list[Row]) -> list[Row]:
    """``rows`` with ``cell_keep_ratio``: the median keep-ratio of their (policy, prompt length) cell, so
    prompts a few tokens apart (tasks of one cell fitted to slightly different sizes) plot as one point."""
    ratios: dict[tuple[str, object], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("keep_ratio") is not None:
            ratios[(str(r.get("policy")), r.get("length"))].append(float(r["keep_ratio"]))
    cell = {k: statistics.median(v) for k, v in ratios.items()}
    return [{**r, "cell_keep_ratio": cell.get((str(r.get("policy")), r.get("length")))} for r in rows]


def accuracy_vs_keep_ratio(rows: list[Row], out: Path, title: str = "accuracy vs keep-ratio") -> Path:
    """Mean score per (policy, prompt length) cell against the cell's median keep-ratio."""
    return line_plot(by_cell_keep_ratio(rows), "cell_keep_ratio", "score", out, "keep-ratio (KV tokens kept / prompt tokens)", "accuracy", title)


def speed_vs_length(rows: list[Row], out: Path, title: str = "speed vs context length") -> Path:
    """Prefill and decode tokens/s against context length, one line per backend+policy."""
    plt = _pyplot()
    labelled = [{**r, "who": f"{r.get('backend', 'longkv')} {r['policy']}"} for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, y, name in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        series = _series(labelled, "length", y, "who")
        for who, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=who)
        _length_axis(ax, sorted({p[0] for pts in series.values() for p in pts}))
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{name} tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
