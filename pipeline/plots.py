"""Training curves as PNG files, drawn off-screen; result tables as markdown.

Uses `matplotlib.figure.Figure` with the Agg canvas directly rather than pyplot, so no global backend
or figure state is touched (safe inside Ray workers and tests, and nothing leaks between calls).
Accuracies are fractions in [0, 1], as logged; the plots show them in percent.
"""

from __future__ import annotations

import os
from pathlib import Path


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike) -> str:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return str(out)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A markdown table: the header row, the separator, one line per row (cells shown with str)."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def plot_training_curves(
    history: dict[str, list[tuple[int, float]]],
    out_png: str | os.PathLike,
    title: str = "",
    baselines: dict[str, float] | None = None,
) -> str:
    """Two panels against step: reward mean (±std band when `reward/std` is there) and eval accuracy (%).

    history: metric key -> [(step, value), ...], e.g. `Tracker.history`.
    baselines: label -> accuracy fraction, drawn as dashed horizontal lines on the accuracy panel
        (e.g. {"warm start plateau": 0.54, "SFT +10 min": 0.79}).
    Returns the path written.
    """
    fig = _new_figure(11, 4.2)
    ax_reward, ax_acc = fig.subplots(1, 2)

    reward = sorted(history.get("reward/mean", []))
    if reward:
        steps = [s for s, _ in reward]
        means = [v for _, v in reward]
        ax_reward.plot(steps, means, color="tab:blue", lw=1.6, label="reward mean")
        std_by_step = dict(history.get("reward/std", []))
        if std_by_step:
            # Only steps that have both a mean and a std get a band; a missing std is a gap, not zero.
            band = [(s, m, std_by_step[s]) for s, m in reward if s in std_by_step]
            ax_reward.fill_between([s for s, _, _ in band], [m - d for _, m, d in band],
                                   [m + d for _, m, d in band], color="tab:blue", alpha=0.18, lw=0,
                                   label="± 1 std")
        ax_reward.legend(loc="best", fontsize=8)
    else:
        _no_data(ax_reward, "reward/mean")
    ax_reward.set(title="Reward", xlabel="step", ylabel="reward")

    key = "eval/accuracy" if history.get("eval/accuracy") else "eval/success"     # exact match, or episodes'
    accuracy = sorted(history.get(key, []))
    if accuracy:
        ax_acc.plot([s for s, _ in accuracy], [100 * v for _, v in accuracy], color="tab:green", lw=1.6,
                    marker="o", ms=3, label="eval accuracy" if key == "eval/accuracy" else "eval success")
    elif not baselines:
        _no_data(ax_acc, "eval/accuracy")
    for i, (label, value) in enumerate((baselines or {}).items()):
        color = f"C{(i + 3) % 10}"  # skip the blue and green of the curves
        ax_acc.axhline(100 * value, ls="--", lw=1.2, color=color, label=f"{label} ({100 * value:.1f}%)")
    if accuracy or baselines:
        ax_acc.legend(loc="best", fontsize=8)
    ax_acc.margins(y=0.1)  # keep a baseline at the lowest value off the axis frame
    ax_acc.set(title="Eval accuracy", xlabel="step", ylabel="accuracy (%)")

    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_comparison(
    curves: dict[str, list[tuple[float, float]]],
    out_png: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str,
) -> str:
    """Several labelled curves on one axis (algorithms, Tune trials, rlpipe vs TRL). Returns the path."""
    fig = _new_figure(7, 4.2)
    ax = fig.subplots()
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], lw=1.6, label=label,
                marker="o" if len(points) <= 30 else None, ms=3)
    if curves:
        ax.legend(loc="best", fontsize=8)
    else:
        _no_data(ax, "curves")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)
