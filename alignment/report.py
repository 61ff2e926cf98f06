"""End-of-run artefacts shared by DPO and GRPO: a curve PNG and a rich summary table."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the logged history (entries without it are skipped)."""
    steps, values = [], []
    for i, entry in enumerate(history):
        if key in entry and entry[key] is not None:
            steps.append(int(entry.get("step", i + 1)))
            values.append(float(entry[key]))
    return steps, values


def plot_curves(history: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> Path | None:
    """One panel per key that appears in the history; returns the path, or None when nothing was logged."""
    present = [k for k in keys if series(history, k)[0]]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    for ax, key in zip(axes[0], present):
        steps, values = series(history, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.5)
        if len(values) >= 8:  # a running mean makes the trend readable through RL noise
            k = max(2, len(values) // 8)
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=2.5, alpha=0.8, label=f"mean of {k}")
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def first_last(history: list[dict[str, Any]], key: str, window: int = 3) -> tuple[float, float] | None:
    """Mean of the first and of the last ``window`` logged values of ``key``."""
    _, values = series(history, key)
    if not values:
        return None
    w = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def print_summary(title: str, rows: list[tuple[str, str]], log=print) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
