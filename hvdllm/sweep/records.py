"""What a sweep keeps on disk, so that a sweep killed at any point continues with ``--resume``.

``DIR/sweep.json``      the sweep's definition (space, sampler, seed, trials, train arguments);
``DIR/trials/NNN.json`` one record per started trial: its values, then its status once it ended;
``DIR/trials/NNN/``     the trial's ``hvdllm train`` run directory; ``DIR/trials/NNN.log`` its output.

Every file is written atomically (temporary file + rename). A record still ``running`` on resume
belongs to a trial that was interrupted: it is rerun with the same values; ended ones never are.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any

FINISHED = ("done", "failed", "pruned")
SPEC_FILE = "sweep.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclasses.dataclass
class TrialRecord:
    """One trial: ``values`` of the searched keys, ``status`` running|done|failed|pruned, ``val_loss``."""

    trial: int
    values: dict[str, Any]
    status: str = "running"
    val_loss: float | None = None
    run_dir: str = ""
    returncode: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def trial_name(n: int) -> str:
    return f"{n:03d}"


def record_path(sweep_dir: Path, n: int) -> Path:
    return sweep_dir / "trials" / f"{trial_name(n)}.json"


def save_record(sweep_dir: Path, rec: TrialRecord) -> None:
    path = record_path(sweep_dir, rec.trial)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(dataclasses.asdict(rec), indent=1))


def load_records(sweep_dir: Path) -> dict[int, TrialRecord]:
    """The trial records found under ``DIR/trials`` by trial number."""
    out = {}
    for p in sorted((sweep_dir / "trials").glob("[0-9][0-9][0-9]*.json")):
        rec = TrialRecord(**json.loads(p.read_text(encoding="utf-8")))
        out[rec.trial] = rec
    return out


def read_column(run_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of the rows of a run's metrics.csv where column ``name`` holds a finite number.

    Tolerates a file being written (an incomplete last line is skipped) or not yet there.
    """
    try:
        text = (Path(run_dir) / "metrics.csv").read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    out = []
    for row in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])):
        try:
            step, v = int(row.get("step") or ""), float(row.get(name) or "nan")
        except ValueError:
            continue
        if math.isfinite(v):
            out.append((step, v))
    return out


def read_curve(run_dir: Path) -> tuple[list[tuple[int, float]], float | None]:
    """(step, training loss) rows and the last validation loss of a run's metrics.csv."""
    val = read_column(run_dir, "val_loss")
    return read_column(run_dir, "loss"), (val[-1][1] if val else None)


def sweep_csv(records: list[TrialRecord], keys: list[str]) -> str:
    """``sweep.csv``: trial, one column per searched key, status, val_loss, run_dir (ended trials)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", *keys, "status", "val_loss", "run_dir"])
    for r in sorted(records, key=lambda r: r.trial):
        if r.finished:
            w.writerow([r.trial, *[r.values.get(k) for k in keys], r.status,
                        "" if r.val_loss is None else repr(r.val_loss), r.run_dir])
    return buf.getvalue()


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """Ended trials, best first: done with a validation loss (lowest first), then pruned, then failed."""
    def key(r: TrialRecord) -> tuple[int, float, int]:
        v = r.val_loss if r.val_loss is not None and math.isfinite(r.val_loss) else math.inf
        group = 0 if r.status == "done" and v < math.inf else 1 if r.status == "pruned" else 2
        return (group, v, r.trial)

    return sorted((r for r in records if r.finished), key=key)


def set_flags(values: dict[str, Any]) -> list[str]:
    """The ``hvdllm train`` arguments that set a trial's values."""
    return [a for k, v in values.items() for a in ("--set", f"{k}={_text(v)}")]


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def leaderboard(records: list[TrialRecord], keys: list[str], train_args: list[str], total: int) -> str:
    """A markdown leaderboard of the ended trials, with the ``hvdllm train`` command of the best."""
    rows = ranked(records)
    lines = [f"# Sweep leaderboard ({len(rows)} of {total} trials ended)", ""]
    best = next((r for r in rows if r.status == "done" and r.val_loss is not None), None)
    if best is not None:
        cmd = " ".join(["hvdllm", "train", *train_args, *set_flags(best.values)])
        lines += [f"Best: trial {trial_name(best.trial)}, val_loss {best.val_loss:.4f}", "", f"    {cmd}", ""]
    lines.append("| rank | trial | " + " | ".join(keys) + " | status | val_loss | run_dir |")
    lines.append("|" + "---|" * (len(keys) + 5))
    for i, r in enumerate(rows, 1):
        v = "" if r.val_loss is None else f"{r.val_loss:.4f}"
        cells = [_fmt(r.values.get(k)) for k in keys]
        lines.append(f"| {i} | {trial_name(r.trial)} | " + " | ".join(cells) + f" | {r.status} | {v} | {r.run_dir} |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
