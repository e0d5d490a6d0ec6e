"""The before/after report: one table of base vs tuned per metric, the gain and the forgetting side by side,
a bar chart, and eval.json with what the numbers depend on.

A model's row is a flat ``{metric: value}`` mapping (the task metrics, ``general_perplexity``, and each
lm-eval metric as ``task/metric``) with lm-eval's standard errors under ``stderr``. Which way is better
is known per metric: lower for perplexity and TER, higher for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = ("perplexity", "ter")
TASK_HEADLINE = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf", "ter", "perplexity")


def lower_is_better(metric: str) -> bool:
    return any(metric.split("/")[-1].split(",")[0].endswith(k) for k in LOWER_IS_BETTER)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def change(base: float | None, tuned: float | None, metric: str) -> str:
    if base is None or tuned is None:
        return ""
    delta = tuned - base
    better = (delta < 0) if lower_is_better(metric) else (delta > 0)
    word = "better" if better and delta else "worse" if delta else "same"
    if metric.endswith("perplexity") and base:
        return f"{delta:+.4g} ({delta / base:+.1%}), {word}"
    return f"{delta:+.4g}, {word}"


def metric_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row["metrics"]:
            if name not in names:
                names.append(name)
    return names


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """| metric | base | tuned | change | (any number of model columns; change is last minus first)."""
    names = metric_order(rows)
    head = "| metric | " + " | ".join(r["label"] for r in rows) + (" | change |" if len(rows) > 1 else " |")
    lines = [head, "|" + " --- |" * (len(rows) + 1 + (len(rows) > 1))]
    for name in names:
        cells = []
        for r in rows:
            value, stderr = r["metrics"].get(name), (r.get("stderr") or {}).get(name)
            cells.append(_fmt(value) + (f" ± {stderr:.2g}" if stderr else ""))
        extra = f" | {change(rows[0]['metrics'].get(name), rows[-1]['metrics'].get(name), name)}" if len(rows) > 1 else ""
        arrow = " ↓" if lower_is_better(name) else " ↑"
        lines.append(f"| {name}{arrow} | " + " | ".join(cells) + extra + " |")
    return "\n".join(lines) + "\n"


def gain_and_forgetting(base: dict[str, Any], tuned: dict[str, Any], task_metric: str | None,
                        general_tasks: Sequence[str]) -> str:
    """One line: what the task gained, next to what general text and general tasks lost (or not)."""
    b, t = base["metrics"], tuned["metrics"]
    parts = []
    if task_metric and task_metric in b and task_metric in t:
        parts.append(f"task gain: {task_metric} {_fmt(b[task_metric])} → {_fmt(t[task_metric])} "
                     f"({change(b[task_metric], t[task_metric], task_metric)})")
    forgetting = []
    if "general_perplexity" in b and "general_perplexity" in t:
        forgetting.append(f"general-text perplexity {_fmt(b['general_perplexity'])} → {_fmt(t['general_perplexity'])} "
                          f"({change(b['general_perplexity'], t['general_perplexity'], 'general_perplexity')})")
    for name in general_tasks:
        if name in b and name in t:
            forgetting.append(f"{name} {_fmt(b[name])} → {_fmt(t[name])} ({change(b[name], t[name], name)})")
    if forgetting:
        parts.append("forgetting: " + "; ".join(forgetting))
    return " | ".join(parts)


def bar_chart(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One small panel per metric (scales differ), a bar per model, lm-eval's stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in metric_order(rows) if any(r["metrics"].get(n) is not None for r in rows)]
    if not names:
        return
    cols = min(4, len(names))
    lines = -(-len(names) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 2.8 * lines), squeeze=False)
    colors = ["#9aa5b1", "#2f6fdb", "#e07b39", "#3aa76d"]
    for ax, name in zip(axes.flat, names):
        values = [r["metrics"].get(name) or 0.0 for r in rows]
        errors = [(r.get("stderr") or {}).get(name) or 0.0 for r in rows]
        ax.bar(range(len(rows)), values, yerr=errors if any(errors) else None, color=colors[: len(rows)], capsize=3)
        if min(values) >= 0:
            ax.set_ylim(0, max(values) * 1.15 or 1.0)  # a metric at 0 for every model still shows an axis from 0
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
        ax.set_title(name + (" (lower is better)" if lower_is_better(name) else ""), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
