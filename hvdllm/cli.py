"""The ``hvdllm`` command: ``hvdllm train`` and ``hvdllm sample``.

The same command runs on one process (``hvdllm train ...``, ``python -m hvdllm.cli train ...``) or on
many (``horovodrun -np N hvdllm train ...``, ``mpirun -np N hvdllm train ...``).

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 1 any other failure (in a
multi-rank job the failing rank ends the whole job); 75 stopped early by SIGTERM/SIGUSR1 or
run.max_minutes, with a checkpoint (continue with --resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hvdllm.core.failure import report_failure
from hvdllm.train import config as C
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
    "tp": "parallel.tp", "pp": "parallel.pp", "exit_at_step": "run.exit_at_step",
}
TRAIN_FLAGS = {key: f"--{name.replace('_', '-')}" for name, key in {**FLAG_KEYS, "resume": "run.resume"}.items()}
SAMPLE_FLAGS = ("tokens", "temperature", "top_k", "seed")   # `hvdllm sample` overrides of sample.*
METAVARS = {"data": "PATH", "out": "DIR", "framework": "NAME", "preset": "NAME"}


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
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")

    sp = sub.add_parser("sample", help="generate text from a checkpoint",
                        description="Generate text from a checkpoint folder or a run folder (its newest checkpoint).")
    sp.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoints/step_N folder or run folder")
    sp.add_argument("--prompt", help="text to continue (default: the run's sample.prompt)")
    for name in SAMPLE_FLAGS:
        _add_key_flag(sp, name, f"sample.{name}", f"default: the run's sample.{name}")
    return p


def train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig for parsed ``train`` arguments (ConfigError on bad input)."""
    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    if args.resume:
        flags["run.resume"] = True
    file_layer = C.load_file(args.config) if args.config else {}
    set_layer = C.parse_sets(args.sets)
    out = flags.get("run.out", set_layer.get("run.out", file_layer.get("run.out", C.RunSection.out)))
    saved = C.saved_layer(str(out)) if args.resume else {}
    return C.build([saved, file_layer, set_layer, flags])


def _rank() -> int:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def _bad_input(msg: str) -> int:
    if _rank() == 0:
        print(f"hvdllm: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    if cfg.run.framework == "tensorflow":
        from hvdllm.train import trainer_keras

        return int(trainer_keras.train(cfg) or 0)
    from hvdllm.train import trainer_torch

    return int(trainer_torch.train(cfg) or 0)


def cmd_sample(args: argparse.Namespace) -> int:
    from hvdllm.train import checkpoint as ckpt

    overrides = {name: C.spec(f"sample.{name}").coerce(getattr(args, name)) for name in SAMPLE_FLAGS
                 if getattr(args, name) is not None}
    path = ckpt.resolve_checkpoint(args.checkpoint)
    if path is None:
        raise ConfigError(f"--checkpoint {args.checkpoint}: no checkpoint there (expected a checkpoints/step_N "
                          "folder or a run folder holding one)")
    framework = ckpt.read_meta(path).get("framework", "torch")
    kwargs = dict(prompt=args.prompt, **overrides)
    if framework == "tensorflow":
        from hvdllm.train import trainer_keras

        text = trainer_keras.sample_checkpoint(str(path), **kwargs)
    else:
        from hvdllm.train import trainer_torch

        text = trainer_torch.sample_checkpoint(str(path), **kwargs)
    print(text)
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
        return cmd_train(args) if args.command == "train" else cmd_sample(args)
    except ConfigError as e:
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
