"""A cost model of one training step of a GPT on a dp x tp x pp layout: memory per rank and step time.

Pure functions over small dataclasses (no framework); ``hvdllm plan`` feeds them a measured
:class:`Machine` and ranks the layouts. Notation: V vocabulary, T sequence length, L layers, d width,
h heads, b micro-batch (sequences), B global batch, m = B / (dp * b) micro-batches per rank and step,
p pipeline stages, t tensor-parallel degree, n data-parallel degree, 4 bytes per fp32 value.

Memory per rank (the largest pipeline stage; what the rank holds at the peak of a step):

- weights W = 4 * P_stage / t, with P_stage the parameters of the stage's blocks (split as the
  pipeline does, :func:`hvdllm.core.pipeline.partition_layers`) plus the token and position
  embeddings on the first stage and the final norm (and a tied head's copy when p > 1) on the last;
- gradients G = W (ZeRO-2: W / n); Adam moments O = 2 W (ZeRO-1 and 2: 2 W / n);
- a fused-allreduce bucket min(bucket_cap, G) when n > 1;
- activations saved for backward, per micro-batch and token (fp32 values, counted on torch's
  autograd graph of hvdllm.models.gpt): per block 4 + h/t + 4 d + 12 d / t (norm inputs and
  statistics, residual, and the tensor-parallel-split q, k, v, attention output, MLP hidden and GELU
  output; scaled-dot-product attention keeps no T x T matrix), on the last stage V / t + 2 d + 5
  (logits, log-softmax, final norm). A stage holds the activations of ``in_flight`` micro-batches at
  once: GPipe all m; 1F1B min(m, p - s) for stage s (stage 0: min(m, p)); no pipeline: 1.

Step time (seconds; the slowest stage sets the pace):

- compute per micro-batch and stage c = F_stage * b * T / R(b), with F_stage the training FLOPs per
  token of the stage on one rank (6 x its parameters / t + 12 L_s d T / t attention, 6 V d / t for the
  head on the last stage) and R(b) the FLOP/s of one rank at micro-batch b (all ranks computing at
  once, as in training), b / (A + C b) fitted to the measured rates (a fixed cost per call, and one
  per sequence); plain data-parallel layouts use the rates measured in a plain data-parallel job
  (``dp_flops_per_s``) when the profile has them: a model-parallel job's Horovod threads cycle every
  1 ms and take ~20% of 2 cores shared by 4 ranks, a data-parallel job's every 20 ms;
- pipeline: (m + p - 1) slots of c; the bubble is the (p - 1) idle slots, the fraction
  (p - 1) / (m + p - 1) of the pipelined time (GPipe and 1F1B alike). Ranks that share cores (more
  ranks than cores, as on a 2-core host running 4) compute faster while their peers idle: R(b) was
  measured with every rank computing, each rank getting min(threads, cores / ranks) cores; in slot j
  only a_j = min(j + 1, p, m, m + p - 1 - j) stages compute, so each active rank runs
  g = min(threads, cores / (a_j n t)) / min(threads, cores / ranks) times as fast
  (:meth:`Machine.speedup`; 1 when the cores suffice), and the pipelined time is
  sum_j c / g_j (:func:`pipelined_slots`). With the ranks pinned round robin (``run.bind_cores``;
  plan's default) a core's share is not spread: the a_j n t active ranks are consecutive, the busiest
  of the cores // threads runs of cores holds ceil(a_j n t / runs) of them, and the slot waits for it.
  Both are upper bounds (the waiting ranks poll and their Horovod threads cycle on the cores they
  leave): when the profile measured g(k), k ranks computing while the others wait in a collective
  (``idle_speedup``), that is used instead;
- a collective of S bytes inside a model-parallel step costs kappa(g) + S / beta(g), both measured *in
  situ* on groups of g ranks (all-reduces of two sizes after ~5 ms of matmuls, minus the matmuls):
  the wait for the background thread's next cycle and the peer's arrival, and copies on cores the
  ranks compute on - several times the back-to-back figures on shared cores (without in-situ figures:
  the ring's 2 (g - 1) alpha and the back-to-back bandwidth);
- tensor parallelism, per slot (at the slot's pace: the collectives' copies and the work every
  tensor-parallel rank repeats run on the cores too, faster while other stages idle, so they count
  sum_j 1 / g_j slots like the compute): 4 collectives per block (2 forward, 2 backward) of b T d values,
  TP_FIRST_EXTRA on the first stage (vocabulary-parallel embedding) and TP_LAST_EXTRA on the last
  (vocabulary-parallel cross-entropy), each kappa(t), the block ones with b T d fp32 values each. When
  the profile ran the model's tensor-parallel shard on groups of t ranks (``tp_probe_s``: forward and
  backward of the probe model, every rank at once), each collective instead costs what that run took
  beyond its split compute, over its collectives (:meth:`Machine.tp_collective_s`): it stands for the
  collectives and the work every tensor-parallel rank repeats (norms, residuals, the loss), which the
  kappa figures missed by 15-45% at 4 ranks on 2 cores;
- pipeline transfers, per slot: an activation and a gradient of b T d values, each a broadcast to a
  peer that already waits, priced from a measured ping-pong (latency + bytes / bandwidth; without it,
  a two-rank in-situ collective as above, which also holds the ranks' skew); per step
  PP_STEP_EXCHANGES more (tied head refresh and gradient, the loss), each kappa(2);
- data parallelism: the ring all-reduce's data time 2 (n - 1) / n * G / beta (ZeRO-1/2: reduce-scatter
  + all-gather, the same volume) and 2 (n - 1) alpha per bucket after the first; a share ``overlap`` of it hides behind the backward of the last
  micro-batch (2/3 of c);
- rounds: the step's sequential collectives outside the slots (:func:`rounds_per_step`: the gradient
  reduction, the stop agreement every ``stop_check_interval`` steps unless it overlaps the step
  (``run.stop_check_overlap``: torch starts it before the step and finishes it after; Keras'
  collectives complete at once), the loss every
  ``log_interval``,
  ZeRO's all-gather and (stage 2) shard norm, torch ZeRO-2's reduce-scatter of each accumulation pass
  but the last, the pipeline's and tensor-parallel's norm) each cost one
  data-parallel cycle in a plain data-parallel job (hvdllm gives Horovod 20 ms on CPU hosts; the
  collective waits for the next cycle, which also absorbs the ranks' skew: measured at 4 ranks on 2
  cores, rounds of kappa(4) ~ 30 ms overpredicted ZeRO's extra rounds, which cost no measurable time)
  and kappa(ranks) in a model-parallel job (1 ms cycle);
- optimizer: P_rank * s_param (ZeRO-1/2: P_rank / n), s_param the measured seconds per parameter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Mapping

from hvdllm.core.pipeline import ideal_bubble, partition_layers

BYTES = 4                      # fp32 weights, gradients, moments and activations
SCHEDULES = ("1f1b", "gpipe")
TP_BLOCK_COLLECTIVES = 4       # per block and micro-batch: 2 forward all-reduces, 2 backward
TP_FIRST_EXTRA = 2             # vocabulary-parallel embedding: forward all-reduce, its backward
TP_LAST_EXTRA = 4              # vocabulary-parallel cross-entropy: max all-gather, sums, head input's backward
PP_STEP_EXCHANGES = 3          # tied head refresh, head gradient back, loss broadcast


@dataclasses.dataclass(frozen=True)
class RunKnobs:
    """What the trainer adds to every step besides the model (hvdllm train's run.* and optim.* knobs)."""

    log_interval: int = 10          # the loss all-reduce every N steps
    stop_check_interval: int = 1    # the stop agreement every N steps
    stop_overlapped: bool = False   # run.stop_check_overlap (torch): the agreement rides with the step, no round
    zero2_per_pass: bool = True     # torch ZeRO-2 reduce-scatters every accumulation pass (Keras: once a step)
    clipping: bool = True           # optim.max_grad_norm > 0: sharded or split norms need an all-reduce


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The GPT's shape as the cost model needs it (hvdllm.models.config.GPTConfig's fields)."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 0          # position-embedding rows (default: seq_len)
    bias: bool = True
    tie_embeddings: bool = True

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block: 2 norms, qkv, attention projection, MLP."""
        d, b = self.n_embd, 1 if self.bias else 0
        return 2 * (1 + b) * d + 3 * d * d + 3 * d * b + d * d + d * b + 4 * d * d + 4 * d * b + 4 * d * d + d * b

    @property
    def embedding_params(self) -> int:
        return (self.vocab_size + (self.block_size or self.seq_len)) * self.n_embd

    @property
    def head_params(self) -> int:
        """Final norm plus an untied head (a tied head reuses the embedding)."""
        d = self.n_embd
        return (2 if self.bias else 1) * d + (0 if self.tie_embeddings else self.vocab_size * d)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run the job: dp x tp x pp ranks, ZeRO stage, micro-batch and pipeline schedule."""

    dp: int
    tp: int
    pp: int
    zero: int
    micro_batch: int
    schedule: str
    global_batch: int

    @property
    def ranks(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def plain_dp(self) -> bool:
        """Data parallelism only (no tensor or pipeline split): a plain data-parallel job."""
        return self.tp == 1 and self.pp == 1

    @property
    def microbatches(self) -> int:
        """m: micro-batches per rank per optimizer step (the gradient accumulation)."""
        return self.global_batch // (self.dp * self.micro_batch)


def fit_call_cost(rates: Mapping[int, float]) -> tuple[float, float]:
    """(A, C) >= 0 of the seconds per FLOP-per-sequence of a call, u(b) = b / R(b) = A + C b, fitted to
    the measured rates by least squares of the relative error (every micro-batch weighs alike)."""
    pts = [(float(b), b / float(r)) for b, r in rates.items()]
    s11 = sum(1 / u ** 2 for _, u in pts)
    s12 = sum(b / u ** 2 for b, u in pts)
    s22 = sum(b * b / u ** 2 for b, u in pts)
    y1, y2 = sum(1 / u for _, u in pts), sum(b / u for b, u in pts)
    det = s11 * s22 - s12 * s12
    if det > 0:
        a, c = (y1 * s22 - y2 * s12) / det, (y2 * s11 - y1 * s12) / det
        if a >= 0 and c >= 0:
            return a, c
        if a < 0:
            return 0.0, y2 / s22
    return y1 / s11, 0.0


def _nearest_group(by_size: Mapping[int, float], group: int) -> float:
    """The figure measured on ``group`` ranks, else on the nearest measured group size (the larger on a tie)."""
    return float(by_size[min(by_size, key=lambda k: (abs(k - group), -k))])


@dataclasses.dataclass(frozen=True)
class Machine:
    """Measured (or assumed) figures of one rank of the machine; see hvdllm.plan.measure."""

    flops_per_s: Mapping[int, float]      # micro-batch -> achieved training FLOP/s of one rank
    allreduce_latency_s: float            # alpha per ring hop
    allreduce_bw: float                   # beta, bytes/s per link
    p2p_latency_s: float
    p2p_bw: float
    optimizer_s_per_param: float
    memory_bytes: float                   # usable memory per rank
    overlap: float = 0.0                  # share of the data-parallel all-reduce hidden by backward
    dp_cycle_s: float = 0.0               # collective cycle of a data-parallel job (Horovod's cycle time)
    insitu_s: Mapping[int, float] = dataclasses.field(default_factory=dict)   # group size -> kappa(g)
    insitu_bw: Mapping[int, float] = dataclasses.field(default_factory=dict)  # group size -> beta(g), bytes/s
    cores: int = 0                        # the host's cores (0: unknown, no core sharing modelled)
    threads_per_rank: int = 1
    measured_ranks: int = 0               # ranks computing at once when flops_per_s was measured
    tp_probe_s: Mapping[int, Mapping[int, float]] = dataclasses.field(default_factory=dict)  # t -> b -> s
    probe_layers: int = 0                 # blocks of the model tp_probe_s ran (the first and last stage too)
    dp_flops_per_s: Mapping[int, float] = dataclasses.field(default_factory=dict)  # in a plain dp job
    bound: bool = False                   # each rank pinned to its share of the cores (run.bind_cores)
    idle_speedup: Mapping[int, float] = dataclasses.field(default_factory=dict)  # k computing, the rest waiting
    pp_exchange_latency_s: float = 0.0    # a pipeline exchange (broadcast to a waiting peer): latency ...
    pp_exchange_bw: float = 0.0           # ... and bandwidth (0: priced as an in-situ collective)

    def speedup(self, active: int) -> float:
        """How much faster each of ``active`` computing ranks runs than in the measurement (all
        ``measured_ranks`` computing): the ratio of their core shares. Unpinned, the scheduler spreads k
        ranks evenly: share(k) = min(t, cores / k) for t threads per rank. Pinned (``bound``: rank r on
        the r-th of the s = cores // t runs of t cores, round robin), the active ranks are consecutive
        (pipeline stages are blocks of ranks), so the busiest run holds ceil(k / s) of them and the
        slot waits for its ranks: share(k) = t / ceil(k / s). Both are upper bounds: the waiting ranks
        poll and their Horovod threads cycle, taking part of the core back, so a measured
        ``idle_speedup`` (k ranks computing while the rest wait) replaces them."""
        if self.idle_speedup and self.measured_ranks:
            return 1.0 if active >= self.measured_ranks else _nearest_group(self.idle_speedup, active)
        if not self.cores or not self.measured_ranks or active < 1:
            return 1.0
        t = self.threads_per_rank
        if self.bound:
            runs = max(1, self.cores // t)
            share = lambda k: t / math.ceil(k / runs)  # noqa: E731
        else:
            share = lambda k: min(t, self.cores / k)  # noqa: E731
        return share(active) / share(self.measured_ranks)

    def rate(self, micro_batch: int, plain_dp: bool = False) -> float:
        """R(b) = b / (A + C b): a forward+backward costs a fixed A per call (Python, kernel launches,
        per-call work) plus C per sequence, fitted to the measured rates (:func:`fit_call_cost`), so one
        noisy micro-batch does not decide its layouts alone; the measured rate when only one was measured.
        ``plain_dp``: the rates measured in a plain data-parallel job (``dp_flops_per_s``) when there are
        any: its Horovod threads cycle every 20 ms on CPU hosts, not every 1 ms, and leave the ranks more
        of shared cores (measured: 4 ranks on 2 cores compute ~20% faster)."""
        rates = self.dp_flops_per_s if plain_dp and self.dp_flops_per_s else self.flops_per_s
        if len(rates) == 1:
            return float(next(iter(rates.values())))
        a, c = fit_call_cost(rates)
        return micro_batch / (a + c * micro_batch)

    def kappa(self, group: int) -> float:
        """Seconds one small collective of a ``group``-rank set costs inside a model-parallel step: the
        in-situ figure of that size (else of the nearest measured size), else the ring's 2 (g - 1) alpha."""
        if group <= 1:
            return 0.0
        if self.insitu_s:
            return _nearest_group(self.insitu_s, group)
        return 2 * (group - 1) * self.allreduce_latency_s

    def tp_collective_s(self, shape: "ModelShape", group: int, micro_batch: int) -> float | None:
        """The measured cost of one tensor-parallel collective on ``group`` ranks at micro-batch b: what the
        probe's forward+backward on a tp group took beyond its split compute (F_probe / t * b T / R(b)),
        over the probe's TP_BLOCK_COLLECTIVES L + TP_FIRST_EXTRA + TP_LAST_EXTRA collectives (it stands
        for the replicated work around them too); the nearest measured group and micro-batch (log
        distance). None without such a measurement."""
        if not self.tp_probe_s or not self.probe_layers:
            return None
        t = min(self.tp_probe_s, key=lambda k: (abs(k - group), -k))
        by_b = self.tp_probe_s[t]
        b = min(by_b, key=lambda k: (abs(math.log(k / micro_batch)), k))
        probe = dataclasses.replace(shape, n_layer=self.probe_layers)
        split = stage_flops_per_token(probe, self.probe_layers, t, True, True) * b * shape.seq_len / self.rate(b)
        count = TP_BLOCK_COLLECTIVES * self.probe_layers + TP_FIRST_EXTRA + TP_LAST_EXTRA
        return max(0.0, float(by_b[b]) - split) / count

    def insitu_s_of(self, group: int, nbytes: float, bw: float) -> float:
        """One collective of ``nbytes`` on ``group`` ranks inside a model-parallel step: kappa(g) plus the
        bytes at the in-situ bandwidth beta(g) (nearest measured size), else at ``bw``."""
        if group <= 1:
            return 0.0
        if self.insitu_bw:
            bw = _nearest_group(self.insitu_bw, group)
        return self.kappa(group) + nbytes / bw


@dataclasses.dataclass(frozen=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    buckets: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buckets + self.activations


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute: float          # m slots of the slowest stage
    bubble: float           # (p - 1) idle slots
    tp_comm: float
    pp_comm: float
    dp_comm: float          # exposed (not hidden by backward)
    optimizer: float
    sync: float = 0.0       # the step's sequential rounds (rounds_per_step)

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm + self.optimizer + self.sync

    @property
    def bottleneck(self) -> str:
        parts = {"compute": self.compute, "bubble": self.bubble, "tp-comm": self.tp_comm,
                 "pp-comm": self.pp_comm, "dp-comm": self.dp_comm, "optimizer": self.optimizer, "sync": self.sync}
        return max(parts, key=lambda k: parts[k])


def ring_allreduce_s(nbytes: float, n: int, latency_s: float, bw: float, buckets: int = 1) -> float:
    """Ring all-reduce of ``nbytes`` over n ranks: 2 (n-1)/n * nbytes / bw + 2 (n-1) * latency per bucket."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency_s * max(1, buckets)


def stage_layers(shape: ModelShape, pp: int) -> list[int]:
    """Blocks per pipeline stage, split as hvdllm's pipeline splits them (balanced parameter counts)."""
    bounds = partition_layers([shape.block_params] * shape.n_layer, pp, first_extra=shape.embedding_params,
                              last_extra=shape.head_params)
    return [j - i for i, j in bounds]


def stage_params(shape: ModelShape, pp: int) -> list[int]:
    """Parameters held by each pipeline stage (a tied head's copy counts on the last stage when p > 1)."""
    out = []
    for s, n in enumerate(stage_layers(shape, pp)):
        p = n * shape.block_params
        if s == 0:
            p += shape.embedding_params
        if s == pp - 1:
            p += shape.head_params + (shape.vocab_size * shape.n_embd if shape.tie_embeddings and pp > 1 else 0)
        out.append(p)
    return out


def in_flight(schedule: str, microbatches: int, pp: int, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once (GPipe: m; 1F1B: min(m, p - s))."""
    if pp == 1:
        return 1
    return microbatches if schedule == "gpipe" else min(microbatches, pp - stage)


def activation_values_per_token(shape: ModelShape, layers: int, tp: int, last: bool) -> float:
    """fp32 values saved for backward per token on a stage of ``layers`` blocks (see the module docstring)."""
    d = shape.n_embd
    per_block = 4 + shape.n_head / tp + 4 * d + 12 * d / tp
    return layers * per_block + ((shape.vocab_size / tp + 2 * d + 5) if last else 0.0)


def memory(shape: ModelShape, layout: Layout, bucket_cap_bytes: float = 25 * 2**20) -> Memory:
    """Bytes per rank at the peak of a step on the most loaded pipeline stage."""
    worst = None
    params, layers = stage_params(shape, layout.pp), stage_layers(shape, layout.pp)
    for s in range(layout.pp):
        w = BYTES * params[s] / layout.tp
        g = w / layout.dp if layout.zero >= 2 else w
        o = 2 * w / layout.dp if layout.zero >= 1 else 2 * w
        buckets = min(bucket_cap_bytes, g) if layout.dp > 1 else 0.0
        per_mb = BYTES * layout.micro_batch * shape.seq_len * activation_values_per_token(
            shape, layers[s], layout.tp, last=s == layout.pp - 1)
        m = Memory(w, g, o, buckets, per_mb * in_flight(layout.schedule, layout.microbatches, layout.pp, s))
        if worst is None or m.total > worst.total:
            worst = m
    assert worst is not None
    return worst


def stage_flops_per_token(shape: ModelShape, layers: int, tp: int, first: bool, last: bool) -> float:
    """Training FLOPs per token of one rank of a stage: 6 x matmul parameters + attention, over t."""
    f = 6 * layers * shape.block_params + 12 * layers * shape.n_embd * shape.seq_len
    if last:
        f += 6 * shape.vocab_size * shape.n_embd
    return f / tp


def rounds_per_step(layout: Layout, knobs: RunKnobs = RunKnobs()) -> float:
    """Sequential collectives per step outside the pipelined slots (see the module docstring)."""
    if layout.ranks == 1:
        return 0.0
    r = (0 if knobs.stop_overlapped else 1 / knobs.stop_check_interval) + 1 / knobs.log_interval
    if layout.dp > 1:
        r += 1                                           # the gradient reduction (its last bucket)
        if layout.zero >= 1:                             # the parameters' grouped all-gather, and at
            r += 1 + (1 if knobs.clipping and layout.zero >= 2 else 0)   # stage 2 the shards' norm
        if layout.zero >= 2 and knobs.zero2_per_pass:    # each earlier pass's reduce-scatter, waited for
            r += layout.microbatches - 1                 # before the next pass's buffers (the in-flight bound)
    if knobs.clipping and (layout.pp > 1 or layout.tp > 1):
        r += 1                                           # the norm over stages / tensor shards
    return r


def step_time(shape: ModelShape, layout: Layout, machine: Machine, bucket_cap_bytes: float = 25 * 2**20,
              knobs: RunKnobs = RunKnobs()) -> StepTime:
    """Predicted seconds per optimizer step of ``layout`` on ``machine`` (see the module docstring)."""
    p, t, n, b = layout.pp, layout.tp, layout.dp, layout.micro_batch
    m = layout.microbatches
    layers = stage_layers(shape, p)
    tokens = b * shape.seq_len
    plain_dp = layout.plain_dp
    slot = max(stage_flops_per_token(shape, layers[s], t, s == 0, s == p - 1) for s in range(p)) * tokens \
        / machine.rate(b, plain_dp)
    act_bytes = BYTES * tokens * shape.n_embd
    tp_slot = 0.0
    if t > 1:
        each = machine.tp_collective_s(shape, t, b)
        per_block = TP_BLOCK_COLLECTIVES * (each if each is not None else machine.insitu_s_of(
            t, act_bytes, machine.allreduce_bw / (2 * (t - 1) / t)))
        extra = each if each is not None else machine.kappa(t)
        tp_slot = max(layers[s] * per_block + extra * ((TP_FIRST_EXTRA if s == 0 else 0)
                                                       + (TP_LAST_EXTRA if s == p - 1 else 0))
                      for s in range(p))
    exchange = (machine.pp_exchange_latency_s + act_bytes / machine.pp_exchange_bw if machine.pp_exchange_bw
                else machine.insitu_s_of(2, act_bytes, machine.p2p_bw))
    pp_comm = ((m + p - 1) * 2 * exchange + PP_STEP_EXCHANGES * machine.kappa(2)) if p > 1 else 0.0
    grads = BYTES * max(stage_params(shape, p)) / t
    buckets = max(1, math.ceil(grads / bucket_cap_bytes))      # the first bucket's latency is in its round
    dp_data = (2 * (n - 1) / n * grads / machine.allreduce_bw + (buckets - 1) * 2 * (n - 1) * machine.allreduce_latency_s
               if n > 1 else 0.0)
    dp_exposed = dp_data - min(dp_data, machine.overlap * 2 / 3 * slot)
    round_s = (machine.dp_cycle_s or machine.kappa(layout.ranks)) if plain_dp else machine.kappa(layout.ranks)
    opt_params = max(stage_params(shape, p)) / t / (n if layout.zero >= 1 else 1)
    slots = pipelined_slots(m, p, n * t, machine) if p > 1 else m
    bubble = max(0.0, (slots - m) * slot)
    return StepTime(compute=slots * slot - bubble, bubble=bubble, tp_comm=slots * tp_slot,
                    pp_comm=pp_comm, dp_comm=dp_exposed, optimizer=opt_params * machine.optimizer_s_per_param,
                    sync=rounds_per_step(layout, knobs) * round_s)


def pipelined_slots(microbatches: int, pp: int, stage_ranks: int, machine: Machine) -> float:
    """The pipelined phase in slots of full-load compute: sum over the m + p - 1 slots of 1 / g(a_j
    stage_ranks), a_j the stages computing in slot j (see the module docstring); m + p - 1 when the
    cores suffice."""
    m, p = microbatches, pp
    return sum(1.0 / machine.speedup(min(j + 1, p, m, m + p - 1 - j) * stage_ranks) for j in range(m + p - 1))


def bubble_fraction(layout: Layout) -> float:
    """(p - 1) / (m + p - 1)."""
    return ideal_bubble(layout.pp, layout.microbatches)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(ranks: int, shape: ModelShape, global_batch: int, zero_stages: tuple[int, ...] = (0,),
            schedules: tuple[str, ...] = SCHEDULES) -> Iterator[Layout]:
    """Every valid layout for ``ranks``: dp x tp x pp = ranks, t dividing the heads and the vocabulary
    (as hvdllm's tensor parallelism needs), p <= L, b dividing
    B / dp; schedules only with p > 1 (else the default "1f1b"); ZeRO stages > 0 only with dp > 1."""
    for tp in divisors(ranks):
        if shape.n_head % tp or shape.vocab_size % tp:
            continue
        for pp in divisors(ranks // tp):
            if pp > shape.n_layer:
                continue
            dp = ranks // (tp * pp)
            if global_batch % dp:
                continue
            for micro in divisors(global_batch // dp):
                for schedule in (schedules if pp > 1 else ("1f1b",)):
                    for zero in (z for z in zero_stages if z == 0 or dp > 1):
                        yield Layout(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=micro, schedule=schedule,
                                     global_batch=global_batch)
