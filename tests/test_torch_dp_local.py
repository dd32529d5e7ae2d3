"""DistributedOptimizer and the broadcast helpers in one process (local backend), plus their core pieces."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hvdllm.torch as hvd
from hvdllm.core.buckets import Bucket, LaunchTracker
from hvdllm.core.compression import Compression, effective_wire_dtype


@pytest.fixture(autouse=True, scope="module")
def _init() -> None:
    hvd.init()
    assert hvd.backend() == "local"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = data(step)
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_local_matches_plain_torch(make, clip) -> None:
    model = net()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                   max_grad_norm=clip, bucket_cap_mb=0.0002)
    ref_opt = make(ref.parameters())
    assert len(opt._buckets) > 1
    for step in range(10):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else float("inf")))
        ref_opt.step()
        assert opt.grad_norm == pytest.approx(norm, rel=1e-6)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_accumulation_sums_passes_and_set_to_none_false() -> None:
    model, ref = net(), net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backward_passes_per_step=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
        for j in range(2):
            loss_of(model, 10 * step + j).backward()
            loss_of(ref, 10 * step + j).backward()
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # grads live in the bucket buffers after the first reduction: no copies on later steps
    assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() in
               {b.buffer.untyped_storage().data_ptr() for b in opt._buckets} for p in model.parameters())


def test_wrapper_behaves_as_the_inner_optimizer() -> None:
    model = net()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert torch.is_tensor(out) and calls == [1]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005) and inner.param_groups[0]["lr"] == pytest.approx(0.005)
    sd = opt.state_dict()
    assert len(sd["state"]) == 4
    fresh = hvd.DistributedOptimizer(torch.optim.Adam(net().parameters(), lr=1.0))
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.005) and len(fresh.state) == 4
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # Parameters no one gave a gradient keep grad=None and are not stepped.
    frozen = torch.nn.Parameter(torch.ones(3))
    opt2 = hvd.DistributedOptimizer(torch.optim.AdamW([*model.parameters(), frozen], lr=0.1))
    loss_of(model, 1).backward()
    opt2.step()
    assert frozen.grad is None and torch.equal(frozen.data, torch.ones(3))


def test_skip_synchronize_and_manual_clip() -> None:
    model = net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss_of(model, 0).backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.skip_synchronize():
        opt.step()
    step = torch.sqrt(sum(((a - p.detach()) ** 2).sum() for a, p in zip(before, model.parameters())))
    assert float(step) == pytest.approx(0.1 * 0.01, rel=1e-3)


def test_errors() -> None:
    model = net()
    params = list(model.named_parameters())
    with pytest.raises(ValueError, match="duplicate parameter name '0.weight'"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=params + params[:1])
    with pytest.raises(ValueError, match="missing from named_parameters"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=params[:2])
    with pytest.raises(ValueError, match="named_parameters must yield"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=[p for _, p in params])
    for kwargs, word in [({"backward_passes_per_step": 0}, "backward_passes_per_step=0"),
                         ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
                         ({"bucket_cap_mb": -5}, "bucket_cap_mb=-5"),
                         ({"op": "max"}, "unsupported reduce op"),
                         ({"compression": "int8"}, "unknown compression")]:
        with pytest.raises(ValueError, match=word):
            hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        hvd.DistributedOptimizer(object())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already a DistributedOptimizer"):
        hvd.DistributedOptimizer(opt)
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="before step"):
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="backward_passes_per_step=1"):
        loss_of(model, 1).backward()
    opt.step()  # recovers: the next step is clean
    opt.zero_grad()
    with pytest.raises(ValueError, match="root_rank=3"):
        hvd.broadcast_parameters(model.state_dict(), root_rank=3)
    with pytest.raises(ValueError, match="not a tensor"):
        hvd.broadcast_parameters({"a": 1.0})


def test_broadcast_helpers_one_process() -> None:
    model = net()
    before = copy.deepcopy(model.state_dict())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_parameters(model.named_parameters(), root_rank=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hvd.broadcast_optimizer_state(opt, root_rank=0)  # empty state: stays empty, params untouched
    assert len(opt.state) == 0
    loss_of(model, 0).backward()
    opt.step()
    want = copy.deepcopy(opt.state_dict())
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    got = opt.state_dict()
    for i, st in want["state"].items():
        for key, value in st.items():
            assert torch.equal(got["state"][i][key], value)


def test_launch_tracker_orders_buckets() -> None:
    buckets = [Bucket("float32", (3, 2), (0, 1), 2), Bucket("float32", (1,), (0,), 1), Bucket("float32", (0,), (0,), 1)]
    t = LaunchTracker(buckets, 4, passes=1, ordered=True)
    assert t.mark(1) == (True, [])           # bucket 1 ready, waits for bucket 0
    assert t.mark(3) == (True, [])
    assert t.mark(2) == (True, [0, 1])       # bucket 0 completes: 0 and 1 launch, in order
    assert t.remaining() == [2] and t.pending
    with pytest.raises(RuntimeError, match="backward_passes_per_step=1"):
        t.mark(3)
    t.reset()
    assert not t.pending
    u = LaunchTracker(buckets, 4, passes=2, ordered=False)
    assert u.mark(0) == (False, []) and u.mark(0) == (True, [2])
    assert u.remaining() == [0, 1]


def test_effective_wire_dtype() -> None:
    assert effective_wire_dtype("float32", Compression.fp16, frozenset({"float16"})) == ("float16", False)
    assert effective_wire_dtype("float32", Compression.bf16, frozenset({"float16"})) == ("float32", True)
    assert effective_wire_dtype("float32", Compression.none, frozenset()) == ("float32", False)
    assert effective_wire_dtype("int64", Compression.fp16, None) == ("int64", False)
    assert effective_wire_dtype("float16", Compression.fp16, frozenset()) == ("float16", False)


@pytest.mark.parametrize("name,fused", [("AdamW", False), ("AdamW", True), ("LAMB", False), ("SGD", True)])
def test_wraps_hvdllm_optimizers(name: str, fused: bool) -> None:
    """hvdllm.torch.optim's optimizers (including their fused flat-buffer mode) behave the same wrapped."""
    from hvdllm.torch import optim as hopt

    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    model = net()
    ref = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(getattr(hopt, name)(model.parameters(), fused=fused, **kwargs),
                                   named_parameters=model.named_parameters(), max_grad_norm=0.1)
    ref_opt = getattr(hopt, name)(ref.parameters(), fused=fused, **kwargs)
    for step in range(6):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _in_buckets(opt, p_or_grad) -> bool:
    g = p_or_grad.grad if isinstance(p_or_grad, nn.Parameter) else p_or_grad
    return any(b.buffer.data_ptr() <= g.data_ptr() < b.buffer.data_ptr() + b.buffer.numel() * b.buffer.element_size()
               for b in opt._buckets)


@pytest.mark.parametrize("fused", [None, False, True], ids=["torch", "hvdllm", "hvdllm-fused"])
def test_grads_stay_bucket_views_and_the_fused_optimizer_reads_them(fused) -> None:
    """After step 1, zero_grad(set_to_none=True) + backward accumulate straight into the buckets (no copy
    in), the fused optimizer steps on them (no copy out), and results equal torch.optim.AdamW's."""
    from hvdllm.torch import optim as hopt

    model = net()
    ref = copy.deepcopy(model)
    accumulated_into = {}  # where autograd put each gradient (this hook runs before the wrapper's)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda t: accumulated_into.__setitem__(id(t), t.grad))
    kw = dict(lr=0.01, weight_decay=0.1)
    inner = torch.optim.AdamW(model.parameters(), **kw) if fused is None else hopt.AdamW(model.parameters(), fused=fused, **kw)
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(), bucket_cap_mb=0.0002)
    ref_opt = torch.optim.AdamW(ref.parameters(), **kw)
    assert len(opt._buckets) > 1
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        if step:
            assert all(p.grad is None for p in model.parameters()) or fused
        loss_of(model, step).backward()
        if step:
            assert all(_in_buckets(opt, accumulated_into[id(p)]) for p in model.parameters()), step
        opt.step()
        assert all(_in_buckets(opt, p) for p in model.parameters())
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        ref_opt.step()
        if fused and not step:
            own = [f.grad.clone() for flats in inner._flats for f in flats]
    if fused:  # its own gradient buffers are not touched after the first step
        assert all(torch.equal(a, f.grad) for a, f in zip(own, (f for flats in inner._flats for f in flats)))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_predivide_and_wire_scales_and_grad_norm_hook() -> None:
    """gradient_predivide_factor (Horovod's) and 16-bit wires keep the product prescale x postscale;
    grad_norm_fn replaces the norm the clipping and grad_norm use."""
    from hvdllm.core.gradients import ReductionConfig

    cfg = ReductionConfig.create(gradient_predivide_factor=4.0)
    assert cfg.scales(8) == (0.25, 0.5) and ReductionConfig.create().scales(8) == (1.0, 0.125)
    assert ReductionConfig.create().scales(8, "float16") == (0.125, 1.0)      # fp16 sums cannot overflow
    assert cfg.scales(8, "float16") == (0.25, 0.5)                            # an explicit factor wins
    assert ReductionConfig.create(op=hvd.Sum).scales(8, "float16") == (1.0, 1.0)
    with pytest.raises(ValueError, match="gradient_predivide_factor=2.0 needs op=hvd.Average"):
        hvd.DistributedOptimizer(torch.optim.SGD(net().parameters(), lr=0.1), op=hvd.Sum, gradient_predivide_factor=2.0)
    with pytest.raises(ValueError, match="grad_norm_fn=3"):
        hvd.DistributedOptimizer(torch.optim.SGD(net().parameters(), lr=0.1), grad_norm_fn=3)
    model, ref = net(), net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradient_predivide_factor=3.0,
                                   max_grad_norm=0.05, grad_norm_fn=lambda: 10.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        assert opt.grad_norm == 10.0
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        for p in ref.parameters():
            p.grad.mul_(0.05 / (10.0 + 1e-6))
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_backend_wire_dtype_widens_16bit_gradients_mpi_cannot_sum() -> None:
    from hvdllm.core.gradients import backend_wire_dtype

    assert backend_wire_dtype("float16", Compression.none, "mpi") == ("float32", None)
    assert backend_wire_dtype("bfloat16", Compression.none, "horovod") == ("float32", None)
    assert backend_wire_dtype("float16", Compression.none, "horovod") == ("float16", None)
    wire, warning = backend_wire_dtype("float16", Compression.bf16, "mpi")
    assert wire == "float32" and "bfloat16" in warning


def test_fp16_update_unscales_once_then_clips_by_the_global_norm() -> None:
    """The trainer's fp16 step: reduce, unscale, one clip by the optimizer's global norm (grad_norm_fn:
    here a tensor-parallel peer shard adds 3.0**2 to the squared norm), then the scaler's step."""
    from hvdllm.train.trainer_torch import apply_update

    model, ref = net(), net()
    peer_sq = 9.0

    def global_norm() -> float:
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()) + peer_sq))

    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), grad_norm_fn=global_norm)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        apply_update(opt, scaler, max_grad_norm=1.0)
        ref_opt.zero_grad()
        loss_of(ref, step).backward()
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters()) + peer_sq))
        assert opt.grad_norm == pytest.approx(norm, rel=1e-5)
        for p in ref.parameters():
            p.grad.mul_(min(1.0, 1.0 / (norm + 1e-6)))
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unfreezing_a_parameter_replans_the_buckets() -> None:
    model = net()
    model[2].weight.requires_grad_(False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    assert id(model[2].weight) not in [id(p) for b in opt._buckets for p in b.params]
    loss_of(model, 0).backward()
    opt.step()
    model[2].weight.requires_grad_(True)
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()
    assert id(model[2].weight) in [id(p) for b in opt._buckets for p in b.params] and _in_buckets(opt, model[2].weight)
