"""hvdllm.core.costmodel: the planner's formulas against hand-computed cases, the pipeline schedules and
the model's real parameter, gradient, optimizer-state and saved-activation bytes."""
from __future__ import annotations

import dataclasses
import math

import pytest

from tests.threads import one_torch_thread  # noqa: F401  (autouse fixture)

from hvdllm.core import costmodel as CM
from hvdllm.core.pipeline import build_schedule
from hvdllm.models.config import PRESETS, GPTConfig

# V=16, T=4, L=2, h=2, d=8, bias, tied: a block has 2*2*8 + (3*64+24) + (64+8) + (256+32) + (256+8) = 872 params
SMALL = CM.ModelShape(vocab_size=16, seq_len=4, n_layer=2, n_head=2, n_embd=8)
MACHINE = CM.Machine(flops_per_s={1: 1e9, 4: 2e9}, allreduce_latency_s=1e-4, allreduce_bw=1e9, p2p_latency_s=1e-5,
                     p2p_bw=2e9, optimizer_s_per_param=1e-8, memory_bytes=1e6)


def shape(g: GPTConfig) -> CM.ModelShape:
    return CM.ModelShape(vocab_size=g.vocab_size, seq_len=g.block_size, n_layer=g.n_layer, n_head=g.n_head,
                         n_embd=g.n_embd, block_size=g.block_size, bias=g.bias, tie_embeddings=g.tie_embeddings)


def lay(dp=1, tp=1, pp=1, zero=0, micro=1, schedule="1f1b", gb=8) -> CM.Layout:
    return CM.Layout(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=micro, schedule=schedule, global_batch=gb)


def test_parameter_counts_match_the_model_config() -> None:
    assert SMALL.block_params == 872
    assert SMALL.embedding_params == (16 + 4) * 8 and SMALL.head_params == 16
    for g in [*PRESETS.values(), dataclasses.replace(PRESETS["tiny"], bias=False, tie_embeddings=False)]:
        s = shape(g)
        assert s.embedding_params + g.n_layer * s.block_params + s.head_params == g.num_params()
        assert sum(CM.stage_params(s, 1)) == g.num_params()


def test_ring_allreduce_and_bubble_by_hand() -> None:
    # 2 (n-1)/n * S / bw + 2 (n-1) * alpha * buckets = 1.5e-3 + 6e-4
    assert CM.ring_allreduce_s(1e6, 4, 1e-4, 1e9) == pytest.approx(2.1e-3)
    assert CM.ring_allreduce_s(1e6, 4, 1e-4, 1e9, buckets=3) == pytest.approx(1.5e-3 + 1.8e-3)
    assert CM.ring_allreduce_s(1e6, 1, 1e-4, 1e9) == 0.0
    assert CM.bubble_fraction(lay(pp=4, micro=1, gb=8)) == pytest.approx(3 / 11)
    assert CM.bubble_fraction(lay(pp=1, micro=1, gb=8)) == 0.0


def test_memory_by_hand() -> None:
    P = 20 * 8 + 2 * 872 + 16                     # 1920 parameters
    act_per_token = 2 * (4 + 2 + 16 * 8) + 16 + 2 * 8 + 5     # 305 values
    m = CM.memory(SMALL, lay(dp=2, micro=2, gb=8), bucket_cap_bytes=1000)
    assert (m.weights, m.grads, m.optimizer, m.buckets) == (4 * P, 4 * P, 8 * P, 1000)
    assert m.activations == 4 * 2 * 4 * act_per_token
    z1 = CM.memory(SMALL, lay(dp=2, zero=1, micro=2, gb=8), bucket_cap_bytes=1000)
    z2 = CM.memory(SMALL, lay(dp=2, zero=2, micro=2, gb=8), bucket_cap_bytes=1000)
    assert (z1.grads, z1.optimizer) == (4 * P, 4 * P) and (z2.grads, z2.optimizer) == (2 * P, 4 * P)
    # tensor parallel 2: weights halve; per block 4 + h/2 + 4d + 12d/2 values, the head V/2 + 2d + 5
    t2 = CM.memory(SMALL, lay(tp=2, micro=1, gb=8))
    assert t2.weights == 2 * P and t2.buckets == 0
    assert t2.activations == 4 * 4 * (2 * (4 + 1 + 32 + 48) + 8 + 16 + 5)


def test_pipeline_memory_by_hand() -> None:
    # pp=2: stage 0 = embeddings + block 0, stage 1 = block 1 + norm + tied head copy (16*8)
    assert CM.stage_layers(SMALL, 2) == [1, 1]
    assert CM.stage_params(SMALL, 2) == [160 + 872, 872 + 16 + 128]
    per_block, head = 4 + 2 + 16 * 8, 16 + 16 + 5
    g = CM.memory(SMALL, lay(pp=2, micro=1, schedule="gpipe", gb=8))     # m=8 in flight on both stages
    assert g.activations == max(8 * 4 * 4 * per_block, 8 * 4 * 4 * (per_block + head))
    assert g.weights == 4 * (872 + 16 + 128)
    f = CM.memory(SMALL, lay(pp=2, micro=1, schedule="1f1b", gb=8))     # 1F1B: 2 on stage 0, 1 on stage 1
    s0 = 4 * (160 + 872) * 4 + 2 * 4 * 4 * per_block
    s1 = 4 * (872 + 144) * 4 + 1 * 4 * 4 * (per_block + head)
    assert f.total == max(s0, s1)


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 2)])
def test_in_flight_equals_the_schedules_peak(kind: str, p: int, m: int) -> None:
    sched = build_schedule(kind, p, m)
    assert [CM.in_flight(kind, m, p, s) for s in range(p)] == [sched.peak_in_flight(s) for s in range(p)]


def test_step_time_by_hand() -> None:
    # no in-situ figures: kappa(2) falls back to the ring's 2 (n-1) alpha = 2e-4
    k2 = 2e-4
    assert MACHINE.kappa(2) == pytest.approx(k2) and MACHINE.kappa(1) == 0
    # default knobs: a stop check every step, the loss every 10, clipping
    # dp=2, tp=1, pp=1, micro 4, B=8 -> m=1; flops/token = 6*(2*872) + 12*2*8*4 + 6*16*8 = 12000
    t = CM.step_time(SMALL, lay(dp=2, micro=4, gb=8), MACHINE, bucket_cap_bytes=1e9)
    slot = 12000 * 4 * 4 / 2e9
    assert t.compute == pytest.approx(slot) and t.bubble == 0 and t.tp_comm == 0 and t.pp_comm == 0
    assert t.dp_comm == pytest.approx(2 * 1 / 2 * 4 * 1920 / 1e9)         # one bucket: its latency is a round
    assert t.sync == pytest.approx((1 + 0.1 + 1) * k2)                   # stop, loss / 10, gradients
    assert t.optimizer == pytest.approx(1920 * 1e-8)
    # four buckets: 3 more ring latencies 2 (n-1) alpha
    t4 = CM.step_time(SMALL, lay(dp=2, micro=4, gb=8), MACHINE, bucket_cap_bytes=4 * 1920 / 4)
    assert t4.dp_comm - t.dp_comm == pytest.approx(3 * 2e-4)
    # pp=2, micro 1 (rate 1e9), m=8: 9 slots; slowest stage = block 1 + head: 6*872 + 12*8*4 + 6*16*8
    t = CM.step_time(SMALL, lay(pp=2, micro=1, gb=8), MACHINE)
    slot = (6 * 872 + 12 * 8 * 4 + 6 * 16 * 8) * 4 / 1e9
    assert t.compute == pytest.approx(8 * slot) and t.bubble == pytest.approx(slot)
    assert t.pp_comm == pytest.approx(9 * 2 * (k2 + 4 * 4 * 8 / 2e9) + 3 * k2)
    assert t.sync == pytest.approx((1 + 0.1 + 1) * k2)                   # stop, loss / 10, the stages' norm
    assert t.bubble / (t.compute + t.bubble) == pytest.approx(CM.bubble_fraction(lay(pp=2, micro=1, gb=8)))
    # tp=2, m=2: per slot 4 collectives per block of b*T*d*4 bytes over 2 ranks + 2 + 4 at the edges
    t = CM.step_time(SMALL, lay(tp=2, micro=4, gb=8), MACHINE)
    act = 4 * 4 * 4 * 8
    assert t.tp_comm == pytest.approx(2 * (2 * 4 * (k2 + act / 1e9) + 6 * k2))
    assert t.compute == pytest.approx(2 * 12000 / 2 * 16 / 2e9)
    assert t.total == pytest.approx(t.compute + t.tp_comm + t.optimizer + t.sync)
    # a plain data-parallel job's rounds each wait for the data-parallel cycle (20 ms)
    cyc = dataclasses.replace(MACHINE, dp_cycle_s=0.02)
    t = CM.step_time(SMALL, lay(dp=2, micro=4, gb=8), cyc, bucket_cap_bytes=1e9)
    assert t.dp_comm == pytest.approx(4 * 1920 / 1e9) and t.sync == pytest.approx(2.1 * 0.02)
    assert t.bottleneck == "sync"
    t = CM.step_time(SMALL, lay(dp=1, tp=2, micro=4, gb=8), cyc)
    assert t.dp_comm == 0 and t.sync == pytest.approx(2.1 * k2)      # a model-parallel job: kappa per round
    # measured in-situ figures replace the fallback, the nearest size standing in for a missing one
    ins = dataclasses.replace(MACHINE, insitu_s={2: 0.005, 4: 0.009})
    assert ins.kappa(2) == 0.005 and ins.kappa(4) == 0.009 and ins.kappa(3) == 0.009 and ins.kappa(8) == 0.009
    t = CM.step_time(SMALL, lay(tp=2, micro=4, gb=8), ins)
    assert t.tp_comm == pytest.approx(2 * (2 * 4 * (0.005 + act / 1e9) + 6 * 0.005))
    # ... and an in-situ bandwidth the back-to-back one, for activations and pipeline hand-offs alike
    ins = dataclasses.replace(ins, insitu_bw={2: 1e6})
    t = CM.step_time(SMALL, lay(tp=2, micro=4, gb=8), ins)
    assert t.tp_comm == pytest.approx(2 * (2 * 4 * (0.005 + act / 1e6) + 6 * 0.005))
    t = CM.step_time(SMALL, lay(pp=2, micro=1, gb=8), ins)
    assert t.pp_comm == pytest.approx(9 * 2 * (0.005 + 4 * 4 * 8 / 1e6) + 3 * 0.005)
    # a measured ping-pong (the receiver already waiting) prices the per-slot hand-offs; the step's 3 more stay kappa
    pong = dataclasses.replace(ins, pp_exchange_latency_s=0.002, pp_exchange_bw=5e5)
    t = CM.step_time(SMALL, lay(pp=2, micro=1, gb=8), pong)
    assert t.pp_comm == pytest.approx(9 * 2 * (0.002 + 4 * 4 * 8 / 5e5) + 3 * 0.005)


def test_rounds_per_step_by_hand() -> None:
    k = CM.RunKnobs(log_interval=4, stop_check_interval=2, stop_overlapped=False, clipping=True)
    assert CM.rounds_per_step(lay(), k) == 0                                   # one process: none
    assert CM.rounds_per_step(lay(dp=2), k) == pytest.approx(0.5 + 0.25 + 1)
    assert CM.rounds_per_step(lay(dp=2, zero=1), k) == pytest.approx(0.75 + 1 + 1)   # + all-gather (local norm)
    # + all-gather, shard norm, and (torch) the reduce-scatters of the 3 passes before the last of m = 4
    assert CM.rounds_per_step(lay(dp=2, zero=2), k) == pytest.approx(0.75 + 1 + 2 + 3)
    assert CM.rounds_per_step(lay(dp=2, zero=2), dataclasses.replace(k, clipping=False)) == pytest.approx(0.75 + 2 + 3)
    assert CM.rounds_per_step(lay(dp=2, zero=2), dataclasses.replace(k, zero2_per_pass=False)) == pytest.approx(0.75 + 3)
    assert CM.rounds_per_step(lay(dp=2, zero=2, micro=4), k) == pytest.approx(0.75 + 1 + 2)  # m = 1
    assert CM.rounds_per_step(lay(tp=2), k) == pytest.approx(0.75 + 1)        # the shards' norm
    assert CM.rounds_per_step(lay(pp=2), dataclasses.replace(k, clipping=False)) == pytest.approx(0.75)
    assert CM.rounds_per_step(lay(dp=2, pp=2, gb=8), k) == pytest.approx(0.75 + 1 + 1)
    # run.stop_check_overlap (torch): the agreement starts before the step and finishes after, no round
    assert CM.rounds_per_step(lay(dp=2), dataclasses.replace(k, stop_overlapped=True)) == pytest.approx(0.25 + 1)


def test_machine_rate_fits_a_cost_per_call_and_per_sequence() -> None:
    # two measured points are fitted exactly: b / R(b) = A + C b with 1e-9 = A + C, 2e-9 = A + 4 C
    assert MACHINE.rate(4) == pytest.approx(2e9) and MACHINE.rate(1) == pytest.approx(1e9)
    assert MACHINE.rate(2) == pytest.approx(2 / (2 / 3 + 2 / 3) * 1e9) and MACHINE.rate(8) == pytest.approx(2.4e9)
    # one point 20% off among four: the fit stays within 10% of the true rate there
    true = {b: b / (1e-9 + 2e-9 * b) for b in (1, 2, 4, 8)}
    noisy = dataclasses.replace(MACHINE, flops_per_s={**true, 4: 0.8 * true[4]})
    assert abs(noisy.rate(4) / true[4] - 1) < 0.1 and abs(noisy.rate(16) / (16 / 33e-9) - 1) < 0.1
    # a fit that would need a negative per-sequence cost keeps a cost per call only; one point is its rate
    a, c = CM.fit_call_cost({1: 1e9, 2: 4e9})
    assert a > 0 and c == 0
    assert dataclasses.replace(MACHINE, flops_per_s={4: 3e9}).rate(1) == 3e9
    # rates measured in a plain data-parallel job price the plain data-parallel layouts only
    dp = dataclasses.replace(MACHINE, dp_flops_per_s={1: 2e9, 4: 4e9})
    assert dp.rate(4, plain_dp=True) == pytest.approx(4e9) and dp.rate(4) == pytest.approx(2e9)
    assert MACHINE.rate(4, plain_dp=True) == pytest.approx(2e9)       # none measured: the one set of rates
    t_dp = CM.step_time(SMALL, lay(dp=2, micro=4, gb=8), dp)
    assert t_dp.compute == pytest.approx(12000 * 16 / 4e9)
    assert CM.step_time(SMALL, lay(tp=2, micro=4, gb=8), dp).compute == pytest.approx(2 * 12000 / 2 * 16 / 2e9)


def test_ranks_sharing_cores_compute_faster_in_the_pipeline_fill_and_drain() -> None:
    shared = dataclasses.replace(MACHINE, cores=2, threads_per_rank=1, measured_ranks=4)
    assert shared.speedup(4) == 1 and shared.speedup(2) == 2 and shared.speedup(1) == 2
    assert shared.speedup(3) == pytest.approx((2 / 3) / 0.5)
    assert dataclasses.replace(shared, measured_ranks=2).speedup(1) == 1      # the cores suffice: no gain
    assert MACHINE.speedup(1) == 1                                             # cores unknown
    # pinned round robin (rank r on core r % 2): 3 consecutive active ranks put 2 on one core -> no gain
    pinned = dataclasses.replace(shared, bound=True)
    assert pinned.speedup(3) == 1 and pinned.speedup(2) == 2 and pinned.speedup(1) == 2 and pinned.speedup(4) == 1
    wide = dataclasses.replace(MACHINE, cores=16, threads_per_rank=4, measured_ranks=8, bound=True)
    assert wide.speedup(4) == 2 and wide.speedup(5) == 1          # 4 runs of 4 cores; 8 ranks: 2 per run
    # measured gains (k ranks computing while the others wait) replace both formulas; k >= all: none
    meas = dataclasses.replace(pinned, idle_speedup={1: 1.5, 2: 1.4, 3: 1.1})
    assert meas.speedup(2) == 1.4 and meas.speedup(3) == 1.1 and meas.speedup(4) == 1 and meas.speedup(8) == 1
    assert CM.pipelined_slots(1, 2, 2, meas) == pytest.approx(2 / 1.4)       # dp 2 x pp 2, m = 1: 2 slots, 2 active
    # tp 2 x pp 2, m = 1: the tensor-parallel work of a slot runs at the slot's pace too (2 ranks active)
    alone = CM.step_time(SMALL, lay(tp=2, pp=2, micro=4, gb=4), meas)
    plain = CM.step_time(SMALL, lay(tp=2, pp=2, micro=4, gb=4), dataclasses.replace(meas, idle_speedup={}, cores=0))
    assert plain.tp_comm > 0 and alone.tp_comm == pytest.approx(plain.tp_comm / 1.4)
    # p = 4, m = 4, a rank per stage: a_j = 1, 2, 3, 4, 3, 2, 1 stages computing
    assert CM.pipelined_slots(4, 4, 1, MACHINE) == 7
    assert CM.pipelined_slots(4, 4, 1, shared) == pytest.approx(0.5 + 0.5 + 0.75 + 1 + 0.75 + 0.5 + 0.5)
    assert CM.pipelined_slots(1, 2, 1, shared) == pytest.approx(1.0)          # 2 slots at twice the speed
    # dp 2 x pp 2, m = 8: the first and last of 9 slots have one stage (2 ranks) computing -> 8 slots, no bubble
    t = CM.step_time(SMALL, lay(dp=2, pp=2, micro=1, gb=16), shared)
    slot = (6 * 872 + 12 * 8 * 4 + 6 * 16 * 8) * 4 / 1e9
    assert t.compute == pytest.approx(8 * slot) and t.bubble == 0
    assert t.pp_comm == CM.step_time(SMALL, lay(dp=2, pp=2, micro=1, gb=16), MACHINE).pp_comm


def test_a_measured_tensor_parallel_shard_sets_the_cost_per_collective() -> None:
    assert MACHINE.tp_collective_s(SMALL, 2, 4) is None
    # the probe (SMALL's 2 blocks) on 2 ranks at b = 4: split compute 6000 flops/token * 16 tokens / 2e9,
    # plus 14 collectives (4 per block, 2 embedding, 4 loss) of 1 ms each
    split = 6000 * 16 / 2e9
    m = dataclasses.replace(MACHINE, tp_probe_s={2: {4: split + 14e-3}}, probe_layers=2)
    assert m.tp_collective_s(SMALL, 2, 4) == pytest.approx(1e-3)
    assert m.tp_collective_s(SMALL, 4, 2) == pytest.approx(1e-3)     # the nearest group and micro-batch
    t = CM.step_time(SMALL, lay(tp=2, micro=4, gb=8), m)              # m = 2 slots of 14 collectives
    assert t.tp_comm == pytest.approx(2 * 14e-3)
    assert t.compute == pytest.approx(2 * split)


def test_layout_counts() -> None:
    tiny = shape(PRESETS["tiny"])                 # 4 heads, 4 layers
    assert len(list(CM.layouts(1, tiny, 16))) == 5                  # micro in 1, 2, 4, 8, 16
    # dp2: 4 micro; tp2: 5; pp2: 5 micro x 2 schedules
    assert len(list(CM.layouts(2, tiny, 16))) == 4 + 5 + 10
    # with ZeRO 0/1/2 (dp > 1 only): dp4 3x3, dp2pp2 4x2x3, pp4 5x2, dp2tp2 4x3, tp2pp2 5x2, tp4 5
    assert len(list(CM.layouts(4, tiny, 16, zero_stages=(0, 1, 2)))) == 9 + 24 + 10 + 12 + 10 + 5
    assert list(CM.layouts(5, tiny, 16)) == []                       # 5 ranks: no divisor fits
    odd_vocab = dataclasses.replace(tiny, vocab_size=255)            # tp must divide the vocabulary too
    assert {x.tp for x in CM.layouts(2, odd_vocab, 16)} == {1}
    three = list(CM.layouts(3, tiny, 16))                            # only pp=3 (3 does not divide 4 heads nor 16)
    assert {(x.dp, x.tp, x.pp) for x in three} == {(1, 1, 3)} and len(three) == 10
    for x in CM.layouts(4, tiny, 16, zero_stages=(0, 1, 2)):
        assert x.ranks == 4 and x.microbatches * x.micro_batch * x.dp == 16 and 4 % x.tp == 0


@pytest.mark.parametrize("preset,micro", [("tiny", 1), ("tiny", 4), ("small", 2)])
def test_memory_prediction_matches_the_models_real_bytes(preset: str, micro: int) -> None:
    """Weights, grads, AdamW moments and autograd's saved activations of a real step, within 15%."""
    import torch

    from hvdllm.models.gpt import GPT
    from hvdllm.torch.optim import AdamW

    torch.manual_seed(0)
    g = PRESETS[preset]
    model = GPT(g)
    opt = AdamW(model.parameters(), lr=1e-4)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, g.vocab_size, (micro, g.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in params)
    loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    measured = (activations + nbytes(model.parameters()) + nbytes(p.grad for p in model.parameters())
                + nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0))
    predicted = CM.memory(shape(g), lay(micro=micro, gb=micro)).total
    assert math.isclose(predicted, measured, rel_tol=0.15), (predicted, measured)
