"""`hvdllm train --framework tensorflow`: the GPT training loop on Keras 3 (TensorFlow backend) + hvdllm.tensorflow.

The same run as the torch trainer (hvdllm.train.trainer_torch), step for step: the learning rate of the
step from the core's schedule; this rank's micro-batches of the step (its slice of the global batch,
hvdllm.data); per micro-batch one compiled ``tf.function`` computes the loss and its gradients and hands
them to ``hvd.DistributedOptimizer(AdamW, backward_passes_per_step=accum, average_aggregated_gradients=True,
max_grad_norm=...)``, which sums the ``accum`` local gradient sets, averages them over the data-parallel
ranks, clips the global norm and applies AdamW (hvdllm.tensorflow.optim: the core's math) once per step.
So the update is the gradient of the mean loss over the whole global batch, whatever the number of ranks.
``--zero 1|2`` shards AdamW's moments (and with 2 the reduced gradients) over the ranks
(``zero_stage``, hvdllm.tensorflow.zero); its checkpoints hold the unsplit state in the replicated
optimizer's format (the shards gathered), so a run resumes on another world size or ``--zero`` stage.

Model parallelism (``--tp``/``--pp``): :class:`hvdllm.train.model_parallel_keras.ModelParallelKeras` runs
this rank's tensor-parallel pipeline stage through the core's schedules, averages over the data-parallel
group, clips on the unsplit model's norm and steps (``--zero 1|2``: AdamW's moments sharded over the
data-parallel group); its checkpoints hold the unsplit weights and Adam moments keyed by parameter name
(``optimizer_format`` "unsplit"), which any tp x pp layout and ``--zero`` stage resumes.

Checkpoints use the shared format (hvdllm.train.checkpoint) with the weights under PyTorch's parameter
names and layouts (hvdllm.models.gpt_keras.torch_state_dict), so a Keras checkpoint also loads into the
PyTorch GPT. Precision: fp32, or bf16 through Keras's ``mixed_bfloat16`` policy (float32 variables);
fp16 loss scaling is left to the torch trainer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

import keras

import hvdllm.tensorflow as hvd
from hvdllm.core.cpu import cpu_flags, precision_advice, read_cpuinfo
from hvdllm.core.evaluation import eval_batches
from hvdllm.core.preemption import EXIT_PREEMPTED
from hvdllm.models.gpt_keras import GPT, GPTConfig, cross_entropy, load_torch_state_dict, torch_state_dict
from hvdllm.train import checkpoint as ckpt
from hvdllm.train import replicas
from hvdllm.train.metrics import LossLog
from hvdllm.train.model_parallel import grid_process_sets
from hvdllm.train.resume import OPTIMIZER_FORMATS
from hvdllm.train.model_parallel_keras import ModelParallelKeras
from hvdllm.train.progress import peak_flops
from hvdllm.train.run_setup import RunSetup, create_run_dir, rank_threads, setup_run
from hvdllm.train.loop import StepHooks, run_training
from hvdllm.train.config import ConfigError, TrainConfig

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}
_SEED_STRIDE = 1_000_003      # per-rank offset of the dropout seed generators (rank 0 keeps the model's)


# -- device, threads, precision --------------------------------------------------------------------------
def configure_tensorflow(cfg: TrainConfig, threads: int) -> str | None:
    """Threads per rank, the GPU of this rank (visible devices) and the precision policy.

    Returns the GPU's name, or None on CPU. Call before TensorFlow runs its first op (thread settings
    are fixed then; a later call keeps TF's settings).
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    name = None
    if cfg.run.device == "cuda" and not gpus:
        raise ConfigError("run.device=cuda but TensorFlow sees no GPU; use run.device=cpu or auto")
    if cfg.run.device == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass
    elif gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        try:
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
        name = tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")
    if cfg.run.precision not in POLICIES:
        raise ConfigError(f"run.precision={cfg.run.precision} is not supported with --framework tensorflow; "
                          f"allowed: {', '.join(POLICIES)}")
    keras.mixed_precision.set_global_policy(POLICIES[cfg.run.precision])
    return name


# -- optimizer ---------------------------------------------------------------------------------------------
def make_optimizer(model: GPT, cfg: TrainConfig, accum: int) -> Any:
    """AdamW (the core's math) with weight decay on matrices only, made data-parallel and built.

    The distributed optimizer sums ``accum`` gradient sets, divides by ``accum`` (the mean over the
    micro-batches), averages over the ranks, clips, then steps; ``parallel.zero`` > 0 shards its state.
    """
    from hvdllm.tensorflow.optim import AdamW

    opt = AdamW(learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, beta_1=cfg.optim.beta1,
                beta_2=cfg.optim.beta2, epsilon=cfg.optim.eps)
    opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) < 2])
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                   "bf16": hvd.Compression.bf16}[cfg.run.compression]
    dist = hvd.DistributedOptimizer(opt, compression=compression, backward_passes_per_step=accum,
                                    average_aggregated_gradients=True, op=hvd.Average,
                                    max_grad_norm=cfg.optim.max_grad_norm, bucket_cap_mb=cfg.run.bucket_cap_mb,
                                    zero_stage=cfg.parallel.zero)
    dist.build(model.trainable_variables)
    return dist


# -- compiled steps ----------------------------------------------------------------------------------------
_TOKENS = tf.TensorSpec([None, None], tf.int32)


class Steps:
    """The compiled functions of a run: one micro-batch (forward, backward, optimizer.apply) and evaluation.

    Traced without autograph: the code has no Python control flow on tensors (the distributed
    optimizer's accumulation uses ``tf.cond``), and converting Keras's optimizer code made tracing
    about 3x slower here.
    """

    def __init__(self, model: GPT, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        variables = model.trainable_variables

        @tf.function(input_signature=[_TOKENS, _TOKENS], autograph=False)
        def micro_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = cross_entropy(model(x, training=True), y)
            grads = tape.gradient(loss, variables)
            # Dense kernels' gradients lose their static shape with dynamic (batch, time) inputs; the
            # reduction's bucket plan needs it, so restate it from the variables.
            grads = [g if isinstance(g, tf.IndexedSlices) else tf.ensure_shape(g, v.shape)
                     for g, v in zip(grads, variables)]
            optimizer.apply(grads, variables)     # accumulates; reduces, clips and steps on the last micro-batch
            return loss

        @tf.function(input_signature=[_TOKENS, _TOKENS], autograph=False)
        def eval_sum(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            logits = tf.cast(model(x, training=False), tf.float32)
            per_tok = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return tf.reduce_sum(tf.reduce_mean(tf.cast(per_tok, tf.float64), axis=1))

        self.micro_step, self.eval_sum = micro_step, eval_sum

    def step(self, micro: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """One optimizer step over this rank's micro-batches; the mean of their losses."""
        total = 0.0
        for x, y in micro:
            total += float(self.micro_step(tf.constant(x, tf.int32), tf.constant(y, tf.int32)))
        return total / len(micro)


# -- checkpoint state <-> Keras ------------------------------------------------------------------------------
def seed_variables(model: GPT) -> list[Any]:
    """The model's dropout seed-generator states (empty when dropout is 0)."""
    return [v for v in model.non_trainable_variables if "seed_generator" in v.path]


def decorrelate_dropout(model: GPT, rank: int) -> None:
    """Different (reproducible) dropout masks on each rank, as the torch trainer's seed + 1 + rank."""
    for v in seed_variables(model):
        state = v.numpy()
        state[0] += _SEED_STRIDE * rank
        v.assign(state)


def optimizer_arrays(optimizer: Any) -> dict[str, np.ndarray]:
    """The optimizer's variables (iterations, learning rate, moments) by Keras's own index keys; with
    ZeRO the unsplit state a replicated optimizer would hold (gathered: a collective, every rank calls it)."""
    store: dict[str, Any] = {}
    optimizer.save_own_variables(store)
    return {k: np.asarray(v) for k, v in store.items()}


def load_optimizer_arrays(optimizer: Any, store: dict[str, np.ndarray]) -> None:
    """:func:`optimizer_arrays`' format (of any world size or ``--zero`` stage) into ``optimizer``; ValueError
    naming the count or the variable and shapes that do not fit."""
    if getattr(optimizer, "zero_stage", 0):
        optimizer.load_own_variables(store)          # checks, then keeps this rank's shards
        return
    if len(store) != len(optimizer.variables):
        raise ValueError(f"the optimizer state holds {len(store)} variables, this run's optimizer "
                         f"{len(optimizer.variables)}")
    for i, v in enumerate(optimizer.variables):
        a = store[str(i)]
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"optimizer variable {i} ({v.path}) has shape {list(a.shape)}, this run needs "
                             f"{list(v.shape)}")
    optimizer.load_own_variables(store)


def checkpoint_meta(s: RunSetup, step: int, pending: list, **extra: Any) -> dict[str, Any]:
    """meta.json of a Keras checkpoint of ``step`` (weights under PyTorch's names and layouts)."""
    return {**s.checkpoint_meta(step), "framework": "tensorflow", "weights_layout": "torch",
            "pending_losses": pending, **extra}


def save(s: RunSetup, model: GPT, optimizer: Any, step: int, losses: LossLog) -> Path | None:
    """Write a checkpoint of ``step`` (a collective: every rank contributes its dropout RNG; rank 0 writes)."""
    pending = losses.pending()
    seeds = seed_variables(model)
    rng_arrays: dict[str, np.ndarray] = {}
    if seeds:
        mine = tf.stack([tf.convert_to_tensor(v) for v in seeds])[None]        # (1, n_generators, 2)
        rng_arrays["keras_seed_generators"] = np.asarray(hvd.allgather(mine) if s.size > 1 else mine)
    opt_arrays = optimizer_arrays(optimizer)
    if not s.is_root:
        return None
    meta = checkpoint_meta(s, step, pending, optimizer_variables=[v.path for v in optimizer.variables])
    files = {"model": torch_state_dict(model), "optimizer": opt_arrays}
    if rng_arrays:
        files["rng"] = rng_arrays
    return s.write_checkpoint(step, files, meta)


def state_checksums(model: GPT, optimizer: Any) -> np.ndarray:
    """The sum of each model and optimizer variable's elements read as integers of their width (floats
    by their bits), in int64 -- exact, order-independent. Dropout seed states differ per rank by design
    and are left out, as is optimizer state sharded over the ranks (``zero_stage`` > 0)."""
    out = []
    sharded = getattr(optimizer, "zero_stage", 0)        # state split over the data-parallel ranks
    for v in [*model.variables, *([] if sharded else optimizer.variables)]:
        if "seed_generator" in v.path:
            continue
        t = tf.convert_to_tensor(v)
        if t.dtype.is_floating:
            t = tf.bitcast(t, {2: tf.int16, 4: tf.int32, 8: tf.int64}[t.dtype.size])
        out.append(int(tf.reduce_sum(tf.cast(t, tf.int64))))
    return np.array(out, dtype=np.int64)


def check_replicas(s: RunSetup, model: GPT, optimizer: Any, step: int) -> None:
    """Compare this rank's state digest with the other replicas' (an allgather on every rank); raises
    replicas.ReplicaMismatch naming the step and the ranks that differ."""
    mine = replicas.digest(state_checksums(model, optimizer))[None]
    rows = np.asarray(hvd.allgather(tf.constant(mine))) if s.size > 1 else mine
    replicas.check(step, rows, s.grid.all_members("dp"))


def load_weights(model: GPT, arrays: dict[str, np.ndarray], where: str) -> None:
    try:
        load_torch_state_dict(model, arrays, strict=True)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def restore(s: RunSetup, model: GPT, optimizer: Any, losses: LossLog) -> None:
    """Load weights, optimizer state, dropout RNG states and unlogged losses from ``s.resume_from``."""
    files, meta = ckpt.read_checkpoint(s.resume_from)
    losses.restore(meta.get("pending_losses", []))
    load_weights(model, files["model"], str(s.resume_from))
    try:
        load_optimizer_arrays(optimizer, files.get("optimizer", {}))
    except ValueError as e:
        raise ConfigError(f"--resume from {s.resume_from}: {e}") from None
    states = files.get("rng", {}).get("keras_seed_generators")
    seeds = seed_variables(model)
    if states is not None and seeds and states.shape[1] == len(seeds):
        for v, st in zip(seeds, states[s.rank % len(states)]):
            v.assign(st)


# -- the loop ---------------------------------------------------------------------------------------------
def evaluate(s: RunSetup, steps: Steps) -> float:
    """Mean validation loss over run.eval_sequences fixed windows, split over the data-parallel ranks."""
    windows = s.windows.val_windows(s.cfg.run.eval_sequences)
    total, count = 0.0, 0
    for ids, counted in eval_batches(windows, s.dp_rank, s.plan.dp_size, s.cfg.batch.micro_batch):
        if not counted:             # no collective inside a Keras forward (data parallelism only): skip padding
            continue
        x, y = s.windows.batch(ids)
        total += float(steps.eval_sum(tf.constant(x, tf.int32), tf.constant(y, tf.int32)))
        count += int(y.shape[0])
    both = np.array([total, float(count)], dtype=np.float64)
    if s.size > 1:
        both = np.asarray(hvd.allreduce(tf.constant(both), op=hvd.Sum))
    return float(both[0] / both[1])


def sample_text(model: GPT, tokenizer: Any, prompt: str, tokens: int, temperature: float, top_k: int,
                seed: int) -> str:
    ids = [int(i) for i in tokenizer.encode(prompt)] or [0]
    out = model.generate(np.array([ids], dtype=np.int64), tokens, temperature=temperature, top_k=top_k or None,
                         seed=seed)
    return tokenizer.decode(out[0].tolist())


def sum_starter(collectives: Any, name: Callable[[], str | None]) -> Callable[[np.ndarray], Callable[[], np.ndarray]]:
    """StepHooks.start_sum_over_ranks over ``collectives``, each allreduce named by ``name()`` (the
    model-parallel runner names its collectives; TF's handles complete at once)."""
    def start(vec: np.ndarray) -> Callable[[], np.ndarray]:
        h = collectives.start("allreduce", tf.constant(vec), hvd.Sum, hvd.WORLD, name=name())
        return lambda: np.asarray(h.wait())
    return start


def train(cfg: TrainConfig) -> int:
    """Run (or resume) training as configured; returns the exit status (0, or EXIT_PREEMPTED after an
    agreed early stop). ConfigError -> the CLI's 2."""
    hvd.init(process_sets=grid_process_sets(cfg.parallel.tp, cfg.parallel.pp))
    rank, size = hvd.rank(), hvd.size()
    threads = rank_threads(hvd, cfg.run.bind_cores, cfg.run.threads)
    if cfg.run.precision == "fp16":
        raise ConfigError("run.precision=fp16 is not supported with --framework tensorflow; allowed: fp32, bf16")
    gpu_name = configure_tensorflow(cfg, threads)

    s = setup_run(cfg, rank, size, hvd.broadcast_object)
    cfg = s.cfg
    peak, peak_src = peak_flops(cfg.run.peak_flops, gpu_name, threads)
    note = (f"Keras {keras.__version__} on TensorFlow {tf.__version__}, {gpu_name or 'CPU'}, "
            f"{threads} thread(s) per rank, precision {cfg.run.precision}; "
            f"MFU against {peak / 1e12:.3g} TFLOP/s per rank ({peak_src})")
    advice = precision_advice(cfg.run.precision, "gpu" if gpu_name else "cpu", cpu_flags(read_cpuinfo()))
    note += f"\n{advice}" if advice else ""
    if cfg.parallel.tp * cfg.parallel.pp > 1:
        return train_model_parallel(s, peak, note)
    model = GPT(s.gpt, seed=cfg.run.seed)             # identical initial weights on every rank ...
    optimizer = make_optimizer(model, cfg, s.plan.accum)
    steps = Steps(model, optimizer)
    losses = LossLog(size, lambda vec: hvd.allreduce(tf.constant(vec), op=hvd.Average).numpy())

    if s.resume_from is None and s.init_weights is not None:     # --init-from: its weights, a fresh optimizer
        load_weights(model, s.init_weights, f"--init-from {s.init_from}")
    # Nothing has been written so far; from here on, the run directory exists.
    create_run_dir(s)
    if s.resume_from is not None:
        restore(s, model, optimizer, losses)
    else:
        hvd.broadcast_variables(model.trainable_variables, root_rank=0)   # ... and, to be sure, rank 0's
        hvd.broadcast_variables(optimizer.variables, root_rank=0)
        decorrelate_dropout(model, rank)
    if size > 1:
        hvd.barrier()

    g = cfg.batch.global_batch

    def step(i: int, lr: float) -> float:
        optimizer.learning_rate = lr
        return float(steps.step(s.windows.micro_batches(i, g, s.dp_rank, s.plan.dp_size, cfg.batch.micro_batch)))

    def grad_norm() -> float | None:
        gn = getattr(optimizer, "grad_norm", None)       # after averaging, before clipping
        return float(gn.numpy()) if gn is not None else None

    def sample(prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str | None:
        return sample_text(model, s.tokenizer, prompt, tokens, temperature, top_k, seed) if s.is_root else None

    hooks = StepHooks(step=step, evaluate=lambda: evaluate(s, steps),
                      save=lambda i, ls: save(s, model, optimizer, i, ls), grad_norm=grad_norm, sample=sample,
                      start_sum_over_ranks=sum_starter(hvd.collectives(), lambda: None),
                      check_replicas=lambda i: check_replicas(s, model, optimizer, i))
    end = run_training(s, hooks, losses, s.gpt.flops_per_token(), peak, size, note)
    if size > 1:
        hvd.barrier()              # (rank 0 has finished writing before any rank exits)
    return EXIT_PREEMPTED if end.stopped else 0


def train_model_parallel(s: RunSetup, peak: float, note: str) -> int:
    """The training run of a tp x pp layout (hvdllm.train.model_parallel_keras); returns the exit status."""
    run = ModelParallelKeras(s)
    losses = LossLog(s.size, lambda vec: np.asarray(run.collectives.allreduce(
        tf.constant(vec), hvd.Average, hvd.WORLD, name=run.op_name("loss"))))
    create_run_dir(s)                   # nothing has been written before; from here on, the run directory exists
    if s.resume_from is not None:
        files, meta = ckpt.read_checkpoint(s.resume_from)
        losses.restore(meta.get("pending_losses", []))
        run.restore(files, str(s.resume_from))
    hvd.barrier()
    g, cfg = s.cfg.batch.global_batch, s.cfg

    def step(i: int, lr: float) -> float:
        return run.step(s.windows.micro_batches(i, g, s.dp_rank, s.plan.dp_size, cfg.batch.micro_batch), lr)

    def save_mp(i: int, ls: LossLog) -> Path | None:
        pending = ls.pending()
        files = {"model": run.layout.full_weights(), "optimizer": run.layout.optimizer_state(run.optimizer)}
        state_bytes = run.collectives.allgather(tf.constant([run.state_bytes()], tf.int64), hvd.WORLD,
                                                name=run.op_name("state_bytes"))
        if not s.is_root:
            return None
        meta = checkpoint_meta(s, i, pending, optimizer_format=OPTIMIZER_FORMATS[True],
                               optimizer_state_bytes=[int(b) for b in np.asarray(state_bytes)])   # per rank
        return s.write_checkpoint(i, files, meta)

    def sample(prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str | None:
        weights = run.layout.full_weights()             # (a collective)
        if not s.is_root:
            return None
        model = GPT(s.gpt, seed=0)
        load_weights(model, weights, "the gathered model")
        return sample_text(model, s.tokenizer, prompt, tokens, temperature, top_k, seed)

    hooks = StepHooks(step=step, evaluate=run.evaluate, save=save_mp, grad_norm=lambda: run.grad_norm,
                      sample=sample,
                      start_sum_over_ranks=sum_starter(run.collectives, lambda: run.op_name("stop")))
    end = run_training(s, hooks, losses, s.gpt.flops_per_token(), peak, s.size, note)
    hvd.barrier()
    return EXIT_PREEMPTED if end.stopped else 0


def sample_checkpoint(path: str, prompt: str | None, tokens: int | None, temperature: float | None = None,
                      top_k: int | None = None, seed: int | None = None) -> str:
    """Text generated by the Keras GPT from a checkpoint (a checkpoint folder, or a run folder's newest).

    Any hvdllm checkpoint works: its weights are stored under PyTorch's names either way.
    """
    from hvdllm.data.tokenizer import load_tokenizer
    from hvdllm.train.config import from_dict

    ck = ckpt.resolve_checkpoint(path)
    if ck is None:
        raise ConfigError(f"--checkpoint {path}: no checkpoint there")
    files, meta = ckpt.read_checkpoint(ck)
    cfg = from_dict(meta["config"])
    model = GPT(GPTConfig(**meta["model"]), seed=0)
    load_weights(model, files["model"], str(ck))
    tok = load_tokenizer(ck)
    sp = cfg.sample
    return sample_text(model, tok, sp.prompt if prompt is None else prompt, sp.tokens if tokens is None else tokens,
                       sp.temperature if temperature is None else temperature, sp.top_k if top_k is None else top_k,
                       sp.seed if seed is None else seed)
