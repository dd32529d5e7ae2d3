"""`hvdllm train --framework tensorflow --tp T --pp P`: the Keras model-parallel step runner.

Each rank builds the same seeded Keras GPT the one-process run builds, keeps its tensor-parallel shard
(``--tp`` > 1, :func:`hvdllm.tensorflow.parallel.parallelize_gpt`) and its pipeline stage
(:class:`GPTStage`; one stage holding every block when ``--pp 1``), and runs the step's micro-batches
(the gradient-accumulation count) through :class:`PipelineExecutor` with ``parallel.schedule``. The
step's gradients are averaged over the data-parallel group, clipped on the unsplit model's global norm
(sharded squares summed over tp, then over the stages: :class:`ShardLayout`) and applied by the core's
AdamW, so the update equals the one-process run's. Every collective issued here is named
deterministically: Horovod matches ops by name, and stages issue different numbers of collectives.
``--zero 1|2``: the AdamW is wrapped in ``hvd.DistributedOptimizer(zero_stage=..., process_set=<dp group>)``
(:mod:`hvdllm.tensorflow.zero`), which reduces the step's gradients over the data-parallel group itself
(stage 2: reduce-scattered), keeps the moments of its 1/dp shard of this rank's tp/pp variables, and
clips on the unsplit model's norm through its ``grad_norm_fn`` hook (per-variable squares summed over the
dp shards, then over tp and the stages by :class:`ShardLayout`, as ``--zero 0``); its collectives are
issued within the dp group, whose members run the same stage, so they match in order.
Checkpoints: the unsplit weights and Adam moments keyed by parameter name (PyTorch layout), whatever
the ``--zero`` stage (ZeRO's shards gathered over the dp group), so any layout and stage resumes them.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import tensorflow as tf

import hvdllm.tensorflow as hvd
from hvdllm.core.gradients import clip_coefficient_of
from hvdllm.models.gpt_keras import GPT
from hvdllm.tensorflow.parallel import GPTStage, PipelineExecutor, ShardLayout, gpt_stage_bounds, parallelize_gpt
from hvdllm.tensorflow.zero import slot_bytes
from hvdllm.train.config import ConfigError
from hvdllm.train.model_parallel import check_tp
from hvdllm.train.run_setup import RunSetup

__all__ = ["ModelParallelKeras"]


class ModelParallelKeras:
    """This rank's part of a tp x pp Keras run: stage, executor, shard layout and optimizer."""

    def __init__(self, s: RunSetup) -> None:
        tp, pp = s.cfg.parallel.tp, s.cfg.parallel.pp
        check_tp(s)
        self.s, self.grid, self.rank = s, s.grid, s.rank
        plain = GPT(s.gpt, seed=s.cfg.run.seed)
        bounds = gpt_stage_bounds(plain, pp)          # balanced on the unsplit model: the same for every tp
        tp_model = parallelize_gpt(plain, self.grid.group("tp", self.rank)) if tp > 1 else None
        self.stage = GPTStage(tp_model if tp_model is not None else plain, self.grid.coords(self.rank).pp, pp, bounds)
        self.executor = PipelineExecutor(self.stage, self.grid, self.rank, schedule=s.cfg.parallel.schedule,
                                         collectives=hvd.collectives())
        self.collectives = self.executor.collectives
        self._counter = itertools.count()
        self.layout = ShardLayout(self.stage, tp_model, self.grid, self.rank, self.collectives, self.op_name)
        self.variables = self.executor.variables
        self.dp_set = self.grid.dp_group(self.rank)
        self.grad_norm: float | None = None
        self.optimizer = self._make_optimizer()

    def op_name(self, tag: str) -> str:
        return f"hvdllm.mp.{tag}.{next(self._counter)}"

    def _make_optimizer(self) -> Any:
        from hvdllm.tensorflow.optim import AdamW

        o = self.s.cfg.optim
        opt = AdamW(learning_rate=o.lr, weight_decay=o.weight_decay, beta_1=o.beta1, beta_2=o.beta2, epsilon=o.eps)
        opt.exclude_from_weight_decay(var_list=[v for v in self.variables if len(v.shape) < 2])
        zero = self.s.cfg.parallel.zero
        if zero:
            opt = hvd.DistributedOptimizer(opt, process_set=self.dp_set, max_grad_norm=o.max_grad_norm,
                                           bucket_cap_mb=self.s.cfg.run.bucket_cap_mb, zero_stage=zero,
                                           grad_norm_fn=self._global_norm)
        opt.build(self.variables)
        return opt

    def _global_norm(self, squares: tf.Tensor) -> float:
        """The ZeRO optimizer's hook: the unsplit model's norm from its per-variable squares (kept for the log)."""
        self.grad_norm = self.layout.norm_of_squares(np.asarray(squares).tolist(), self.variables)
        return self.grad_norm

    def state_bytes(self) -> int:
        """Bytes of optimizer state (AdamW's moments) this rank holds: with ``--zero`` its shards only."""
        return self.optimizer.state_bytes() if self.s.cfg.parallel.zero else slot_bytes(self.optimizer)

    def step(self, micro: list[tuple[np.ndarray, np.ndarray]], lr: float) -> float:
        """One optimizer step over this rank's micro-batches; their mean loss."""
        loss, grads = self.executor.step([tf.constant(x, tf.int32) for x, _ in micro],
                                         [tf.constant(y, tf.int32) for _, y in micro])
        self.optimizer.learning_rate = lr
        if self.s.cfg.parallel.zero:        # reduces over the dp group, clips (grad_norm_fn) and steps its shards
            self.optimizer.apply(grads, self.variables)
            return loss
        if self.grid.dp > 1:
            grads = self.collectives.grouped_allreduce(grads, hvd.Average, self.dp_set, name=self.op_name("dp"))
        self.grad_norm = self.layout.grad_norm(grads, self.variables)
        max_norm = self.s.cfg.optim.max_grad_norm
        if max_norm is not None:
            coef = clip_coefficient_of(self.grad_norm, max_norm)
            if coef != 1.0:
                grads = [g * coef for g in grads]
        self.optimizer.apply(grads, self.variables)
        return loss

    def evaluate(self) -> float:
        """Mean validation loss over run.eval_sequences fixed windows, split over the data-parallel ranks."""
        s = self.s
        ids = s.windows.val_windows(s.cfg.run.eval_sequences)[s.dp_rank::s.plan.dp_size]
        total, count, mb = 0.0, 0, s.cfg.batch.micro_batch
        for k in range(0, len(ids), mb):
            x, y = s.windows.batch(ids[k: k + mb])
            total += self.executor.eval_loss_sum(tf.constant(x, tf.int32), tf.constant(y, tf.int32))
            count += int(y.shape[0])
        both = tf.constant([total, float(count)], tf.float64)
        if s.size > 1:        # (tp and pp peers add the same sum and count: the ratio holds)
            both = self.collectives.allreduce(both, hvd.Sum, hvd.WORLD, name=self.op_name("eval"))
        both = np.asarray(both)
        return float(both[0] / both[1])

    def restore(self, files: dict[str, dict[str, np.ndarray]], where: str) -> None:
        """This rank's shards of a checkpoint's unsplit weights and Adam moments."""
        try:
            self.layout.load_full_weights(files["model"], where)
            self.layout.load_optimizer_state(self.optimizer, files.get("optimizer", {}), where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
