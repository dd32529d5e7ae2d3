"""The ``hvdllm plan`` command line (registered by hvdllm.cli)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model size: tiny (default), small, 124m")
    p.add_argument("--config", metavar="FILE", help="a train config (.toml/.yaml); its model and batch are planned")
    p.add_argument("--global-batch", type=int, metavar="N", help="sequences per optimizer step (default: the config's)")
    p.add_argument("--ranks", type=int, metavar="N", help="ranks to plan for (default: the job's size, else 1)")
    p.add_argument("--profile", metavar="FILE", help="machine profile JSON: read it if it exists (no measuring), "
                                                     "else measure and write it")
    p.add_argument("--verify", type=int, default=0, metavar="K", help="run the top K layouts a few steps and "
                                                                     "add the measured step time")
    p.add_argument("--json", action="store_true", help="one JSON object per layout and line")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
