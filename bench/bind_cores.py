"""Seconds per step of `hvdllm train` with and without `run.bind_cores`, side by side.

    .venv/bin/python bench/bind_cores.py [--preset small] [--rounds 2]

For each layout (2 and 4 ranks: data, tensor and pipeline parallel), runs a 20-step `horovodrun -np N
--gloo hvdllm train` pinned and unpinned, alternating, ``--rounds`` times; prints each layout's median
seconds per step (metrics.csv's elapsed_s, the intervals after step 4) pinned and unpinned, and their
ratio (> 1: pinning is faster). The fastest run of each counts, as in `hvdllm plan --verify`: a shared
host can slow one 20-step run down as a whole.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvdllm.plan.cli import launcher, measured_step_s  # noqa: E402

LAYOUTS = [  # ranks, flags
    (2, ["--micro-batch", "8"]),
    (2, ["--micro-batch", "16", "--tp", "2"]),
    (2, ["--micro-batch", "4", "--pp", "2"]),
    (4, ["--micro-batch", "4"]),
    (4, ["--micro-batch", "16", "--tp", "4"]),
    (4, ["--micro-batch", "8", "--pp", "2"]),
]


def step_s(ranks: int, flags: list[str], preset: str, bind: bool, tmp: Path) -> float | None:
    out = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [*launcher(ranks), "train", "--preset", preset, "--global-batch", "16", *flags, "--max-steps", "20",
           "--set", "run.log_interval=4", "--set", "run.eval_interval=0", "--set", f"run.eval_sequences={ranks}",
           "--set", "sample.tokens=0", "--set", "run.progress=false", "--set", "run.tensorboard=false",
           "--set", f"run.bind_cores={str(bind).lower()}", "--out", str(out / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        print(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return measured_step_s(out / "run")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    times: dict[tuple[int, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bind-") as tmp:
        for _ in range(args.rounds):
            for i, (ranks, flags) in enumerate(LAYOUTS):
                for bind in (True, False):
                    t = step_s(ranks, flags, args.preset, bind, Path(tmp))
                    if t is not None:
                        times.setdefault((i, bind), []).append(t)
    print(f"{args.preset}, global batch 16, fastest of {args.rounds} 20-step runs (s/step):")
    for i, (ranks, flags) in enumerate(LAYOUTS):
        pinned, free = min(times.get((i, True), [float("nan")])), min(times.get((i, False), [float("nan")]))
        print(f"  -np {ranks} {' '.join(flags):<28} pinned {pinned:.3f}  unpinned {free:.3f}  "
              f"pinned speed-up {free / pinned:.2f}x")


if __name__ == "__main__":
    main()
