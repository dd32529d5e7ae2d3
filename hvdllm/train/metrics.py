"""Run metrics: ``metrics.csv`` (always), TensorBoard events (when a writer is importable), ``loss.png``,
and the per-step losses averaged over the ranks for each row (:class:`LossLog`).

Only rank 0 writes. On ``--resume`` the CSV keeps the rows up to the checkpoint's step and drops
later ones (written after that checkpoint by the interrupted run), so a resumed run's CSV equals an
uninterrupted run's. No framework is imported here: TensorBoard goes through the framework that the
trainer already loaded (torch's SummaryWriter or tf.summary), or is skipped.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s")
CSV_NAME = "metrics.csv"
PNG_NAME = "loss.png"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


class _TensorBoard:
    """Scalars through torch.utils.tensorboard or tf.summary, whichever framework is loaded."""

    def __init__(self, logdir: Path) -> None:
        self._write = None
        self._close = lambda: None
        if "torch" in sys.modules:
            try:
                from torch.utils.tensorboard import SummaryWriter

                w = SummaryWriter(str(logdir))
                self._write = lambda tag, v, step: w.add_scalar(tag, v, step)
                self._close = w.close
                return
            except Exception:
                pass
        if "tensorflow" in sys.modules:
            try:
                import tensorboard  # noqa: F401  (tf.summary.scalar needs it; without it: no events)
                import tensorflow as tf

                w = tf.summary.create_file_writer(str(logdir))

                def write(tag: str, v: float, step: int) -> None:
                    with w.as_default():
                        tf.summary.scalar(tag, v, step=step)

                self._write, self._close = write, w.close
            except Exception:
                pass

    @property
    def active(self) -> bool:
        return self._write is not None

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if self._write is None:
            return
        for k, v in values.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._write(k, float(v), step)

    def close(self) -> None:
        self._close()


class MetricsLogger:
    """Appends rows to ``<run>/metrics.csv`` (header: COLUMNS) and mirrors them to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / CSV_NAME
        self._tb: _TensorBoard | None = None
        if not enabled:
            return
        rows = read_metrics(self.path) if (resume_step is not None and self.path.is_file()) else []
        keep = [r for r in rows if resume_step is not None and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in keep:
                w.writerow([r.get(c, "") for c in COLUMNS])
        if tensorboard:
            self._tb = _TensorBoard(self.run_dir / "tensorboard")

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns stay empty)."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in COLUMNS])
            f.flush()
        if self._tb is not None:
            self._tb.scalars(int(row["step"]), {k: v for k, v in row.items() if v is not None})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_loss(run_dir: str | Path) -> Path | None:
    """Draw train and validation loss from metrics.csv into loss.png (None when matplotlib is missing)."""
    run = Path(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run / CSV_NAME)
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run / f".{PNG_NAME}.{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run / PNG_NAME)
    return run / PNG_NAME


class LossLog:
    """Per-step losses until the next metrics row: local values, averaged over the ranks in one
    collective per row (or at a checkpoint, which stores them so a resumed run logs the same means).

    ``average(vec)`` is the trainer's allreduce-mean of a float64 numpy vector over the ranks
    (called only when ``size`` > 1), so this bookkeeping is written once for torch and Keras.
    """

    def __init__(self, size: int, average: Callable[[Any], Any]) -> None:
        self.size, self._average, self._local, self._global = size, average, [], []

    def add(self, local_mean: Any) -> None:
        self._local.append(float(local_mean))

    def pending(self) -> list[float]:
        """Average the local values over ranks (a collective) and return all unlogged global values."""
        if self._local:
            import numpy as np

            vec = np.asarray(self._local, dtype=np.float64)
            if self.size > 1:
                vec = np.asarray(self._average(vec), dtype=np.float64)
            self._global.extend(float(v) for v in vec.tolist())
            self._local = []
        return list(self._global)

    def restore(self, values: list[float]) -> None:
        self._local, self._global = [], [float(v) for v in values]

    def mean(self) -> float:
        """The mean of the unlogged steps' global-batch losses; clears them."""
        values = self.pending()
        self._global = []
        return sum(values) / len(values) if values else float("nan")
