"""``hvdllm sweep``: hyper-parameter search over config keys, each trial an ``hvdllm train`` run.

Outputs in ``--out DIR``: ``sweep.csv`` (trial, one column per key, status, val_loss, run_dir),
``leaderboard.md``, ``best_so_far.png``, ``loss_curves.png``, ``importance.png``, and per trial
``trials/NNN/`` (the run directory), ``trials/NNN.log`` and ``trials/NNN.json`` (see records.py).
"""
from hvdllm.sweep.sweep import SweepOptions, run_sweep

__all__ = ["SweepOptions", "run_sweep"]
