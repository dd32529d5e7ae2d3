"""Pipeline parallelism for Keras 3 (TensorFlow backend): stages of any Keras model, GPT stages, and an
executor that runs the core's GPipe/1F1B schedules on Horovod process sets (the Keras twin of
:mod:`hvdllm.torch.parallel.pipeline`).

A Keras user splits a model into consecutive pieces and gives each rank its piece as a :class:`Stage`:

    grid = ProcessGrid(dp=1, tp=1, pp=2, world_size=hvd.size())
    hvd.init(process_sets=grid.process_sets())
    layers = split_layers(model.layers, grid.pp)[grid.coords(hvd.rank()).pp]      # this rank's layers
    stage = Stage(layers, grid.coords(hvd.rank()).pp, grid.pp, activation_shape=lambda x: (x.shape[0], 64),
                  loss=lambda out, y: keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True))
    pipeline = PipelineExecutor(stage, grid, hvd.rank(), schedule="1f1b")
    loss, grads = pipeline.step(micro_inputs, micro_targets)       # grads of stage.trainable_variables
    optimizer.apply(grads, stage.trainable_variables)

:meth:`PipelineExecutor.step` returns the mean loss over the micro-batches (on every stage) and the
gradient of that mean for this stage's variables, which equals the unsplit model's gradient of the
mean over the whole batch. Average ``grads`` over data-parallel replicas (``grid.dp_group``) before
applying them. Every rank must call ``step`` with the same number of micro-batches; the first stage
needs the inputs, the last the targets (others may pass None).

How it runs: each micro-batch's forward is a ``tf.function`` (no XLA) called under its own
``tf.GradientTape``, kept until that micro-batch's backward (``tape.gradient`` with the gradient received
from the next stage), in the order of the schedule's per-stage program. Activations and their
gradients move between adjacent stages as broadcasts inside the link's two-rank process set (Horovod
has no send/recv), named per link and sequence number so Horovod matches them although stages issue
different numbers of other collectives. Tied embeddings of a GPT: the first stage owns the token
embedding; the last stage's head uses a copy refreshed at the start of each step, and its gradient is
sent back and added to the embedding's.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from hvdllm.core.collectives import Collectives
from hvdllm.core.grid import ProcessGrid
from hvdllm.core.pipeline import StageProgram, partition_layers
from hvdllm.core.process_sets import ProcessSet
from hvdllm.models.gpt_keras import torch_names
from hvdllm.tensorflow import basics

__all__ = ["Stage", "GPTStage", "PipelineExecutor", "split_layers", "gpt_stage_bounds"]


def _no_targets() -> tf.Tensor:
    """What stages before the last pass for targets (created on use: importing must not start TensorFlow)."""
    return tf.zeros([0], tf.int32)


def _size(variables: Sequence[Any]) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def split_layers(layers: Sequence[keras.layers.Layer], num_stages: int) -> list[list[keras.layers.Layer]]:
    """Consecutive, non-empty groups of ``layers`` (built), one per stage, balancing parameter counts."""
    bounds = partition_layers([_size(layer.trainable_variables) for layer in layers], num_stages)
    return [list(layers[a:b]) for a, b in bounds]


def _tf_variable(v: Any) -> Any:
    """The tf.Variable behind a Keras variable (what GradientTape watches)."""
    return getattr(v, "value", v) if isinstance(v, keras.Variable) else v


class Stage:
    """This rank's stage: Keras layers called in sequence (``layer(x, training=...)``).

    ``loss(outputs, targets)`` (last stage) returns per-example (or per-position) losses; the executor
    averages them. ``activation_shape`` (stages after the first) is the shape of the activation this
    stage receives for a micro-batch of inputs: a callable ``inputs -> shape`` (the first stage's inputs
    are not available here, so ``inputs`` is the micro-batch the caller passes, or its targets).
    """

    tied_weight: Any = None     # first stage: a variable the last stage's ``tied_head`` copies
    tied_head: Any = None       # last stage: a tf.Variable refreshed from ``tied_weight`` every step

    def __init__(self, layers: Sequence[Any], stage: int, num_stages: int,
                 loss: Callable[[Any, Any], Any] | None = None,
                 activation_shape: Callable[[Any], Sequence[int]] | None = None, dtype: str = "float32") -> None:
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
        self.layers, self.stage, self.num_stages = list(layers), stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        if self.is_last and loss is None:
            raise ValueError(f"stage {stage} is the last of {num_stages}: it needs loss=")
        if not self.is_first and activation_shape is None:
            raise ValueError(f"stage {stage} receives activations: it needs activation_shape=")
        self._loss, self._shape, self.dtype = loss, activation_shape, dtype

    @property
    def trainable_variables(self) -> list[Any]:
        seen, out = set(), []
        for layer in self.layers:
            for v in layer.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def activation_shape(self, inputs: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in self._shape(inputs))

    def __call__(self, x: Any, training: bool = False) -> Any:
        for layer in self.layers:
            x = layer(x, training=training)
        return x

    def loss(self, outputs: Any, targets: Any) -> Any:
        """Per-example (or per-position) losses of the last stage's outputs."""
        return self._loss(outputs, targets)


def gpt_stage_bounds(model: Any, num_stages: int) -> list[tuple[int, int]]:
    """[start, end) block ranges per stage of a Keras GPT, balancing parameter counts (embeddings on the
    first stage, final norm and an untied head on the last)."""
    first = _size(model.wte.trainable_variables + model.wpe.trainable_variables)
    last = _size(model.ln_f.trainable_variables) + (_size(model.lm_head.trainable_variables)
                                                      if model.lm_head is not None else 0)
    return partition_layers([_size(b.trainable_variables) for b in model.h], num_stages,
                            first_extra=first, last_extra=last)


class GPTStage(Stage):
    """Stage ``stage`` of ``num_stages`` of a Keras GPT or :class:`TensorParallelGPT` (blocks
    ``bounds[stage]``, the embeddings on the first stage, final norm, head and loss on the last).

    :meth:`named_weights` names this stage's variables as the unsplit PyTorch GPT's parameters.
    """

    def __init__(self, model: Any, stage: int, num_stages: int,
                 bounds: Sequence[tuple[int, int]] | None = None) -> None:
        bounds = list(bounds) if bounds is not None else gpt_stage_bounds(model, num_stages)
        if len(bounds) != num_stages or not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} of {num_stages} does not fit the partition {bounds}")
        self.model, self.config = model, model.config
        self.start, self.end = bounds[stage]
        blocks = list(model.h[self.start:self.end])
        first, last = stage == 0, stage == num_stages - 1
        parts = ([model.wte, model.wpe] if first else []) + blocks + ([model.ln_f] if last else []) + \
            ([model.lm_head] if last and model.lm_head is not None else [])
        super().__init__(parts, stage, num_stages, loss=self._gpt_loss,
                         activation_shape=lambda idx: (*idx.shape, model.config.n_embd))
        self.blocks = blocks
        shared = model.lm_head is None and num_stages > 1
        if shared and first:
            self.tied_weight = model.wte.embeddings
        if shared and last:
            self.tied_head = tf.Variable(np.asarray(model.wte.embeddings), trainable=False, name="tied_head")

    def __call__(self, x: Any, training: bool = False) -> Any:
        m = self.model
        if self.is_first:
            x = m.embed(x, training=training)
        for block in self.blocks:
            x = block(x, training=training)
        if not self.is_last:
            return x
        if self.tied_head is None:
            return m.head(x)
        if hasattr(m, "head_with"):                       # tensor parallel: this rank's vocabulary rows
            return m.head_with(x, self.tied_head)
        return tf.matmul(m.ln_f(x), tf.cast(self.tied_head, x.dtype), transpose_b=True)

    def _gpt_loss(self, logits: Any, targets: Any) -> Any:
        if hasattr(self.model, "vocab_loss"):              # tensor parallel: vocabulary-split logits
            return self.model.vocab_loss(logits, targets)
        return keras.losses.sparse_categorical_crossentropy(targets, tf.cast(logits, tf.float32), from_logits=True)

    def named_weights(self) -> list[tuple[str, Any, bool]]:
        """(PyTorch parameter name, variable, transposed?) of this stage's variables."""
        mine = {id(v) for v in self.trainable_variables}
        return [(n, v, t) for n, v, t in torch_names(self.model) if id(v) in mine]


class PipelineExecutor(StageProgram):
    """Runs this rank's stage of a pipeline over micro-batches with a GPipe or 1F1B schedule (see the
    module docstring); ``collectives`` defaults to ``hvdllm.tensorflow.collectives()``."""

    def __init__(self, stage: Stage, grid: ProcessGrid, rank: int, schedule: str = "1f1b",
                 collectives: Collectives | None = None) -> None:
        super().__init__(grid, rank, schedule)
        if stage.stage != self.stage or stage.num_stages != grid.pp:
            raise ValueError(f"stage {stage.stage}/{stage.num_stages} does not match {grid.describe(rank)}")
        self.collectives = collectives if collectives is not None else basics.collectives()
        self.module = stage
        shares = stage.tied_weight is not None or stage.tied_head is not None
        self.emb_set = grid.embedding_group(rank) if shares else None
        self.variables = stage.trainable_variables
        self._forward = tf.function(self._run, autograph=False, reduce_retracing=True)
        self._eval = tf.function(self._run_eval, autograph=False, reduce_retracing=True)

    # -- compiled pieces ---------------------------------------------------------------------------------
    def _run(self, x: tf.Tensor, y: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        """The stage's output, or on the last stage its mean loss times ``scale``."""
        out = self.module(x, training=True)
        if self.module.is_last:
            out = tf.reduce_mean(tf.cast(self.module.loss(out, y), tf.float32)) * scale
        return out

    def _run_eval(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The stage's output, or on the last stage the sum over examples of each one's mean loss."""
        out = self.module(x, training=False)
        if not self.module.is_last:
            return out
        per = tf.cast(self.module.loss(out, y), tf.float64)
        per = tf.reshape(per, (tf.shape(per)[0], -1))
        return tf.reduce_sum(tf.reduce_mean(per, axis=1))

    # -- transport ---------------------------------------------------------------------------------------
    def _exchange(self, x: Any, root: int, ps: ProcessSet, tag: str) -> tf.Tensor:
        """Broadcast ``x`` from ``root`` in ``ps``; 16-bit tensors (mixed precision) travel as float32
        (exact both ways; not every backend moves bfloat16), and come back in their own dtype."""
        x = tf.convert_to_tensor(x)
        if x.dtype in (tf.bfloat16, tf.float16):
            wide = self.collectives.broadcast(tf.cast(x, tf.float32), root, ps, name=self._name(tag))
            return tf.cast(wide, x.dtype)
        return self.collectives.broadcast(x, root, ps, name=self._name(tag))

    def _share_loss(self, total: tf.Tensor, tag: str) -> tf.Tensor:
        if self.num_stages == 1:
            return total
        return self.collectives.broadcast(tf.reshape(total, [1]), self.last_rank, self.pp_set,
                                          name=self._name(tag))[0]

    def refresh_tied_head(self) -> None:
        """Copy the first stage's current embedding into the last stage's tied head (embedding group)."""
        mod = self.module
        if self.emb_set is None:
            return
        if mod.tied_weight is not None:
            self._exchange(mod.tied_weight, self.first_rank, self.emb_set, "emb")
        if mod.tied_head is not None:
            mod.tied_head.assign(self._exchange(tf.zeros_like(mod.tied_head), self.first_rank, self.emb_set, "emb"))

    def _input(self, inputs: Sequence[Any] | None, targets: Sequence[Any] | None, mb: int) -> Any:
        ref = inputs[mb] if inputs is not None else targets[mb]
        return tf.zeros(self.module.activation_shape(ref), self.module.dtype)

    # -- a training step ---------------------------------------------------------------------------------
    def step(self, inputs: Sequence[Any] | None, targets: Sequence[Any] | None) -> tuple[float, list[tf.Tensor]]:
        """Forward and backward of every micro-batch; (the mean loss, the gradients of this stage's
        ``trainable_variables``)."""
        mod = self.module
        m = len(inputs) if inputs is not None else len(targets)
        if m < 1 or (mod.is_first and inputs is None) or (mod.is_last and (targets is None or len(targets) != m)):
            raise ValueError(f"stage {self.stage}: need at least one micro-batch, inputs on the first stage "
                             f"and one target per micro-batch on the last")
        sources = [_tf_variable(v) for v in self.variables] + ([mod.tied_head] if mod.tied_head is not None else [])
        grads: list[tf.Tensor | None] = [None] * len(sources)
        recv_in: dict[int, tf.Tensor] = {}
        outputs: dict[int, tf.Tensor] = {}
        tapes: dict[int, tf.GradientTape] = {}
        out_grads: dict[int, tf.Tensor] = {}
        in_grads: dict[int, tf.Tensor] = {}
        total = tf.zeros([], tf.float64)
        scale = tf.constant(1.0 / m, tf.float32)
        self.refresh_tied_head()
        for a in self.schedule(m).actions[self.stage]:
            mb = a.mb
            if a.op == "recv_act":
                recv_in[mb] = self._exchange(self._input(inputs, targets, mb), self.prev_rank, self.prev_set,
                                             self.link_prev)
            elif a.op == "forward":
                x = tf.convert_to_tensor(inputs[mb]) if mod.is_first else recv_in[mb]
                y = tf.convert_to_tensor(targets[mb]) if mod.is_last else _no_targets()
                tape = tf.GradientTape(watch_accessed_variables=False)
                with tape:
                    tape.watch(sources if mod.is_first else [*sources, x])
                    out = self._forward(x, y, scale)
                tapes[mb], outputs[mb] = tape, out
                if mod.is_last:
                    total += tf.cast(out, tf.float64)
            elif a.op == "send_act":
                self._exchange(outputs[mb], self.rank, self.next_set, self.link_next)
            elif a.op == "recv_grad":
                out_grads[mb] = self._exchange(tf.zeros_like(outputs[mb]), self.next_rank, self.next_set, self.link_next)
            elif a.op == "backward":
                out, tape = outputs.pop(mb), tapes.pop(mb)
                wrt = sources if mod.is_first else [*sources, recv_in.pop(mb)]
                g = tape.gradient(out, wrt, output_gradients=None if mod.is_last else out_grads.pop(mb))
                for i, gi in enumerate(g[:len(sources)]):
                    if gi is not None:
                        gi = tf.convert_to_tensor(gi)
                        grads[i] = gi if grads[i] is None else grads[i] + gi
                if not mod.is_first:
                    in_grads[mb] = g[-1] if g[-1] is not None else tf.zeros_like(wrt[-1])
            elif a.op == "send_grad":
                self._exchange(in_grads.pop(mb), self.rank, self.prev_set, self.link_prev)
        out = [g if g is not None else tf.zeros_like(v) for g, v in zip(grads, sources)]
        if mod.tied_head is not None:            # the head's gradient goes back to the embedding's owner
            self._exchange(out.pop(), self.rank, self.emb_set, "emb")
        if mod.tied_weight is not None:
            i = next(i for i, v in enumerate(self.variables) if v is mod.tied_weight)
            out[i] = out[i] + self._exchange(tf.zeros_like(mod.tied_weight), self.last_rank, self.emb_set, "emb")
        return float(self._share_loss(total, "loss")), out

    def eval_loss_sum(self, x: Any, y: Any) -> float:
        """Forward of one batch through the stages (no backward): the sum over examples of each one's
        mean loss, on every stage."""
        mod = self.module
        self.refresh_tied_head()
        h = tf.convert_to_tensor(x) if mod.is_first else \
            self._exchange(tf.zeros(mod.activation_shape(x), mod.dtype), self.prev_rank, self.prev_set, f"eval.{self.link_prev}")
        h = self._eval(h, tf.convert_to_tensor(y) if mod.is_last else _no_targets())
        if not mod.is_last:
            self._exchange(h, self.rank, self.next_set, f"eval.{self.link_next}")
            h = tf.zeros([], tf.float64)
        return float(self._share_loss(h, "eval_loss"))
