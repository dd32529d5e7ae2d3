"""Optimizer step time in Keras 3: every hvdllm.tensorflow.optim optimizer *at its defaults* vs the
keras.optimizers one for the same rule, the way users run them: ``apply_gradients`` eagerly, inside
``tf.function``, and inside ``tf.function(jit_compile=True)`` (XLA; ``model.fit``'s default on TF).

Same GPT-2-style shapes as bench/optimizer_step.py; interleaved rounds (order rotating each round; both
from bench/harness.py); median ms per step and the ratio ``keras time / hvdllm time`` (>= 1.0: hvdllm at
least as fast).

    python bench/optimizer_step_keras.py                              # ~25M parameters, every optimizer
    python bench/optimizer_step_keras.py --sizes 10 --optimizers AdamW --modes jit function
"""
from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from harness import gpt_shapes, step_parser, time_interleaved  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvdllm.tensorflow import optim as kopt  # noqa: E402

# name -> (hvdllm factory, keras factory): each at its defaults (SGD momentum 0.9 as "Momentum")
OPTIMIZERS: Dict[str, Tuple[Callable[[], keras.optimizers.Optimizer], Callable[[], keras.optimizers.Optimizer]]] = {
    "SGD": (lambda: kopt.SGD(), lambda: keras.optimizers.SGD()),
    "Momentum": (lambda: kopt.SGD(momentum=0.9), lambda: keras.optimizers.SGD(momentum=0.9)),
    "Adam": (lambda: kopt.Adam(), lambda: keras.optimizers.Adam()),
    "AdamW": (lambda: kopt.AdamW(), lambda: keras.optimizers.AdamW()),
    "LAMB": (lambda: kopt.LAMB(), lambda: keras.optimizers.Lamb()),
}
MODES = ("eager", "function", "jit")


def make_step(opt: keras.optimizers.Optimizer, values: List[np.ndarray], grads: List[tf.Tensor],
              mode: str) -> Callable[[], None]:
    variables = [keras.Variable(v) for v in values]
    opt.build(variables)

    def step() -> None:
        opt.apply_gradients(zip(grads, variables))

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=(mode == "jit"))


def bench(name: str, size_m: int, rounds: int, modes: List[str]) -> Dict[str, float]:
    shapes = gpt_shapes(size_m * 1_000_000)
    rng = np.random.default_rng(0)
    values = [(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes]
    grads = [tf.constant((rng.standard_normal(s) * 1e-3).astype(np.float32)) for s in shapes]
    ours, theirs = OPTIMIZERS[name]
    variants: Dict[str, Callable[[], None]] = {}
    for mode in modes:
        variants[f"keras {name} {mode}"] = make_step(theirs(), values, grads, mode)
        variants[f"hvdllm {name} {mode}"] = make_step(ours(), values, grads, mode)
    times = time_interleaved(variants, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"\n{name}: {n / 1e6:.1f}M parameters in {len(shapes)} variables, {rounds} interleaved rounds "
          f"(median ms/step; min in brackets: the least disturbed step, telling on a shared machine)")
    for mode in modes:
        k, h = f"keras {name} {mode}", f"hvdllm {name} {mode}"
        print(f"  {mode:<9} keras {med[k]:8.2f} ({low[k]:7.2f}) ms   hvdllm {med[h]:8.2f} ({low[h]:7.2f}) ms   "
              f"keras / hvdllm = {med[k] / med[h]:5.2f}x ({low[k] / low[h]:5.2f}x)")
    return med


def main() -> None:
    ap = step_parser(__doc__.splitlines()[0], list(OPTIMIZERS), 10, "interleaved rounds")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    summary = []
    for size in args.sizes:
        for name in args.optimizers:
            med = bench(name, size, args.rounds, args.modes)
            summary += [(size, name, m, med[f"keras {name} {m}"] / med[f"hvdllm {name} {m}"]) for m in args.modes]
    print("\nsummary (keras time / hvdllm default time; >= 1.0: hvdllm's default is at least as fast)")
    for size, name, mode, ratio in summary:
        print(f"  {size:>4}M  {name:<9} {mode:<9} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
