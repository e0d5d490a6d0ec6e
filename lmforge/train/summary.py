"""End-of-run report: loss curves as a PNG and a short human-readable summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_file


def plot_losses(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> Path | None:
    """Train and eval loss against the optimizer step; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_file(path, fig.savefig)
    plt.close(fig)
    return path


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def summary_markdown(s: dict[str, Any]) -> str:
    rows = [
        ("steps", _fmt(s.get("steps"), "d") + (f" (stopped: {s['stop_reason']})" if s.get("stop_reason") else "")),
        ("wall time", f"{s.get('wall_seconds', 0):.0f} s"),
        ("tokens seen", _fmt(s.get("total_tokens"), ",d")),
        ("tokens/s", _fmt(s.get("tokens_per_s"), ",.0f")),
        ("final train loss", _fmt(s.get("final_train_loss"))),
        ("eval loss (start → saved model)", f"{_fmt(s.get('eval_loss_start'))} → {_fmt(s.get('eval_loss_end'))}"),
        ("best eval loss", f"{_fmt(s.get('best_eval_loss'))} at step {_fmt(s.get('best_step'), 'd')}"),
        ("best checkpoint", _fmt(s.get("best_checkpoint"))),
        ("skipped steps (NaN/inf)", _fmt(len(s.get("skipped_steps") or []), "d")),
        ("peak memory", f"{_fmt(s.get('peak_memory_mb'), ',.0f')} MB"),
        ("trainable parameters", f"{_fmt(s.get('trainable_parameters'), ',d')} of {_fmt(s.get('total_parameters'), ',d')}"),
    ]
    lines = ["# Training run summary", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n\n![loss curves](loss_curves.png)\n"
