"""The ``hvdllm`` command: ``hvdllm train``, ``hvdllm sample``, ``hvdllm export``, ``hvdllm sweep`` and ``hvdllm plan``.

The same command runs on one process (``hvdllm train ...``, ``python -m hvdllm.cli train ...``) or on
many (``horovodrun -np N hvdllm train ...``, ``mpirun -np N hvdllm train ...``).

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 1 any other failure (in a
multi-rank job the failing rank ends the whole job); 75 stopped early by SIGTERM/SIGUSR1 or
run.max_minutes, with a checkpoint (continue with --resume).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from hvdllm.core.failure import report_failure
from hvdllm.train import config as C
from hvdllm.core.launch import LaunchError, detect
from hvdllm.train.config import ConfigError

EPILOG_TRAIN = """\
configuration layers (later ones win): the preset's defaults < the resumed run's saved config <
--config FILE < --set section.key=value < the flags above. Every key is listed below; every run saves
its resolved config as config.toml (a valid --config file).

examples:
  hvdllm train --preset tiny --out runs/demo
  horovodrun -np 2 --gloo hvdllm train --preset tiny --out runs/demo
  hvdllm train --data my_texts/ --set data.tokenizer=bpe --set optim.lr=3e-4 --out runs/mine
  hvdllm train --out runs/demo --max-steps 300 --exit-at-step 100   # then the same with --resume
  horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script ./hosts.sh hvdllm train --elastic --out runs/el

the run directory (--out) holds config.toml, tokenizer.json, metrics.csv (step, loss = mean loss of
the global batches since the previous row, val_loss, lr, grad_norm, tokens_per_s, mfu, elapsed_s),
loss.png, checkpoints/step_NNNNNNNN/ (safetensors weights, optimizer and RNG state) and sample.txt.
MFU = 6N+attention FLOPs per token x tokens/s / (peak FLOP/s per rank x ranks); the peak comes from
run.peak_flops, $HVDLLM_PEAK_FLOPS, a table of GPUs, or a rough CPU estimate (clock x FMA width).
exit status: 0 done, 2 bad input (nothing written), 1 other failure (a failing rank ends the whole job),
75 stopped early by SIGTERM/SIGUSR1 on any rank or run.max_minutes, checkpoint written (--resume).

"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# `hvdllm train` flags that set one config key each; their help comes from the key's field.
FLAG_KEYS = {
    "framework": "run.framework", "preset": "model.preset", "data": "data.path", "out": "run.out",
    "max_steps": "run.max_steps", "global_batch": "batch.global_batch", "micro_batch": "batch.micro_batch",
    "tp": "parallel.tp", "pp": "parallel.pp", "zero": "parallel.zero", "exit_at_step": "run.exit_at_step", "init_from": "run.init_from",
}
TRAIN_FLAGS = {key: f"--{name.replace('_', '-')}" for name, key in {**FLAG_KEYS, "resume": "run.resume",
                                                                                 "elastic": "run.elastic"}.items()}
SAMPLE_FLAGS = ("tokens", "temperature", "top_k", "seed")   # `hvdllm sample` overrides of sample.*
METAVARS = {"data": "PATH", "init_from": "PATH", "out": "DIR", "framework": "NAME", "preset": "NAME"}


def _add_key_flag(parser: argparse.ArgumentParser, name: str, key: str, note: str) -> None:
    """A flag for config ``key``: values stay strings, coerced and checked with the key's field."""
    spec = C.spec(key)
    metavar = METAVARS.get(name, "N" if spec.base is int else "X")
    parser.add_argument(f"--{name.replace('_', '-')}", metavar=metavar,
                        help=f"{spec.knob.help}; allowed: {spec.allowed()} ({note})")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hvdllm",
        description="Train GPT-style language models with Horovod (PyTorch or TensorFlow/Keras 3), "
                    "on one process or under horovodrun/mpirun.",
        epilog="run `hvdllm COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a GPT (embedded corpus by default; no download)",
                       description="Train a GPT on the embedded corpus (Python's own documentation), your text "
                                   "files/folders, or uint16 .bin token files.",
                       epilog=EPILOG_TRAIN + C.describe_keys(TRAIN_FLAGS), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", metavar="FILE", help="a .toml or .yaml file of [section] key = value")
    t.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override one key, e.g. --set optim.lr=3e-4 (repeatable; keys listed below)")
    for name, key in FLAG_KEYS.items():
        _add_key_flag(t, name, key, f"sets {key}")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out that verifies (exit 2 when there is none, "
                        "or when its global batch, seed, data, model shape or layout differ)")
    t.add_argument("--elastic", action="store_true",
                   help="Horovod elastic training under horovodrun --min-np/--max-np --host-discovery-script "
                        "(Gloo; data parallel only): survivors of a lost worker continue from the last commit "
                        "(run.elastic_commit_every), joining workers get rank 0's state, the global batch is kept; "
                        "outside an elastic launch a normal job (mpirun with several ranks: exit 2)")

    sp = sub.add_parser("sample", help="generate text from a checkpoint",
                        description="Generate text from a checkpoint folder or a run folder (its newest checkpoint).")
    sp.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoints/step_N folder or run folder")
    sp.add_argument("--prompt", help="text to continue (default: the run's sample.prompt)")
    for name in SAMPLE_FLAGS:
        _add_key_flag(sp, name, f"sample.{name}", f"default: the run's sample.{name}")

    from hvdllm.models.export import FORMATS

    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder or a nanoGPT ckpt.pt",
                        description="Export a checkpoint (either framework) to a format other tools load.")
    ex.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoints/step_N folder or run folder")
    ex.add_argument("--format", required=True, choices=FORMATS,
                    help="hf: config.json + model.safetensors (GPT2LMHeadModel); nanogpt: ckpt.pt")
    ex.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist)")
    _add_sweep(sub)
    _add_plan(sub)
    return p


def _add_sweep(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="hyper-parameter search: each trial an `hvdllm train` run",
                        description="Search config keys (grid, random, or TPE with early stopping; Optuna). "
                                    "Arguments after -- go to every trial's `hvdllm train`.",
                        epilog="space file (TOML or YAML): optim.lr = {log_uniform = [1e-4, 3e-3]}, "
                               "x = {uniform = [a, b]}, n = {int_uniform = [a, b]}, key = [v1, v2] (categorical "
                               "or grid). example: hvdllm sweep --space space.toml --out sweeps/lr --trials 8 "
                               "-- --preset tiny --max-steps 100")
    sw.add_argument("--space", required=True, metavar="FILE", help="search space, .toml or .yaml")
    sw.add_argument("--out", required=True, metavar="DIR", help="sweep directory (sweep.csv, leaderboard.md, "
                                                                "PNGs, trials/NNN run directories)")
    sw.add_argument("--trials", type=int, metavar="N", help="trials to run (default: the grid's size, else 10)")
    sw.add_argument("--sampler", default="random", metavar="grid|random|tpe",
                    help="grid: every combination; random; tpe: model-based (default random)")
    sw.add_argument("--seed", type=int, default=0, metavar="S", help="sampler seed: same seed, same trials")
    sw.add_argument("--parallel", type=int, default=1, metavar="K", help="trials running at once (default 1)")
    sw.add_argument("--np", type=int, default=1, metavar="K", help="ranks per trial (horovodrun -np K --gloo)")
    sw.add_argument("--resume", action="store_true", help="continue the sweep in --out; ended trials never rerun")
    sw.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS", help="hvdllm train arguments for every trial")


def _add_plan(sub: Any) -> None:
    from hvdllm.plan.cli import add_arguments

    add_arguments(sub.add_parser("plan", help="rank parallel layouts (dp x tp x pp, micro-batch, schedule) "
                                              "by predicted step time and memory",
                                 description="Measure this machine, predict step time and memory of every "
                                             "layout for --ranks, and print them ranked."))


def train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig for parsed ``train`` arguments (ConfigError on bad input)."""
    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    if args.resume:
        flags["run.resume"] = True
    if args.elastic:
        flags["run.elastic"] = True
    file_layer = C.load_file(args.config) if args.config else {}
    set_layer = C.parse_sets(args.sets)
    out = flags.get("run.out", set_layer.get("run.out", file_layer.get("run.out", C.RunSection.out)))
    saved = C.saved_layer(str(out)) if args.resume else {}
    return C.build([saved, file_layer, set_layer, flags])


def _rank() -> int:
    return detect().rank


def _bad_input(msg: str) -> int:
    """Print the one error line (rank 0: every rank reaches the same verdict; under a Horovod elastic
    launch every worker, since one added later judges alone) and return 2."""
    from hvdllm.core.elastic import elastic_launch

    if _rank() == 0 or elastic_launch():
        print(f"hvdllm: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    return 2


def check_launcher() -> None:
    """A forced backend must be one there is (the trainers' init picks the real one; wrong environment
    variables are bad input, not a traceback)."""
    from hvdllm.core.backend import choose_backend

    try:
        choose_backend(lambda: True, lambda: True)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    check_launcher()
    if cfg.run.framework == "tensorflow":
        from hvdllm.train import trainer_keras

        return int(trainer_keras.train(cfg) or 0)
    from hvdllm.train import trainer_torch

    return int(trainer_torch.train(cfg) or 0)


def check_train_args(argv: list[str]) -> None:
    """Raise ConfigError if ``hvdllm train ARGV`` is bad input (parsing and config validation only)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser().parse_args(["train", *argv])
    except SystemExit:
        why = err.getvalue().strip().splitlines()
        raise ConfigError(f"train arguments {' '.join(argv)!r}: {why[-1] if why else 'not accepted'}") from None
    train_config(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from hvdllm.sweep import SweepOptions, run_sweep

    opts = SweepOptions(space=args.space, out=args.out, trials=args.trials, sampler=args.sampler, seed=args.seed,
                        parallel=args.parallel, np=args.np, resume=args.resume, train_args=args.train_args)
    return run_sweep(opts, check_train_args)


def cmd_plan(args: argparse.Namespace) -> int:
    from hvdllm.plan.cli import run

    return run(args, check_train_args)


def cmd_sample(args: argparse.Namespace) -> int:
    from hvdllm.train import checkpoint as ckpt

    overrides = {name: C.spec(f"sample.{name}").coerce(getattr(args, name)) for name in SAMPLE_FLAGS
                 if getattr(args, name) is not None}
    path = ckpt.resolve_checkpoint(args.checkpoint)
    if path is None:
        raise ConfigError(f"--checkpoint {args.checkpoint}: no checkpoint there (expected a checkpoints/step_N "
                          "folder or a run folder holding one)")
    framework = ckpt.verify(path).get("framework", "torch")       # CorruptCheckpoint: exit 2, one line
    kwargs = dict(prompt=args.prompt, **overrides)
    if framework == "tensorflow":
        from hvdllm.train import trainer_keras

        text = trainer_keras.sample_checkpoint(str(path), **kwargs)
    else:
        from hvdllm.train import trainer_torch

        text = trainer_torch.sample_checkpoint(str(path), **kwargs)
    print(text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hvdllm.train.export import export_checkpoint

    print(f"hvdllm export: wrote {export_checkpoint(args.checkpoint, args.format, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hvdllm`` console script; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (2, one line already printed)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {"train": cmd_train, "sample": cmd_sample, "export": cmd_export, "sweep": cmd_sweep,
                    "plan": cmd_plan}
        return commands[args.command](args)
    except (ConfigError, LaunchError) as e:
        return _bad_input(str(e))
    except KeyboardInterrupt:
        print("hvdllm: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any other failure: status 1 with the traceback
        # In a multi-rank job the rank's excepthook (hvdllm.core.failure) prints "hvdllm: rank R failed
        # at step S: ..." and ends the job: a plain return would leave the peers waiting on this rank.
        report_failure(e)
        print(f"hvdllm: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
