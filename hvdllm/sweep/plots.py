"""The sweep's PNGs: best validation loss so far, the trials' loss curves, parameter importance."""
from __future__ import annotations

import math
from pathlib import Path

from hvdllm.sweep import records as R


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def best_so_far(records: list[R.TrialRecord], path: Path) -> None:
    """Validation loss of each done trial (by trial number) and the best so far."""
    plt = _pyplot()
    done = [r for r in sorted(records, key=lambda r: r.trial)
            if r.status == "done" and r.val_loss is not None and math.isfinite(r.val_loss)]
    fig, ax = plt.subplots(figsize=(6, 4))
    best, xs, ys = math.inf, [], []
    for r in done:
        best = min(best, r.val_loss)
        xs.append(r.trial)
        ys.append(best)
    ax.scatter([r.trial for r in done], [r.val_loss for r in done], s=14, label="trial")
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curves(records: list[R.TrialRecord], path: Path) -> None:
    """Training loss against step for every ended trial (pruned: dashed, failed: dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"done": "-", "pruned": "--", "failed": ":"}
    for r in sorted(records, key=lambda r: r.trial):
        curve, _ = R.read_curve(Path(r.run_dir))
        if curve and r.finished:
            ax.plot([s for s, _ in curve], [v for _, v in curve], style[r.status], marker=".",
                    label=f"{R.trial_name(r.trial)} {r.status}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if 0 < len(ax.lines) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def importance(values: dict[str, float], path: Path) -> None:
    """Horizontal bars of each searched key's importance (empty plot with a note if unknown yet)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.4 * max(1, len(values))))
    if values:
        keys = sorted(values, key=values.get)
        ax.barh(keys, [values[k] for k in keys])
        ax.set_xlabel("importance (share of the validation-loss variation)")
    else:
        ax.text(0.5, 0.5, "fewer than 2 finished trials", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
