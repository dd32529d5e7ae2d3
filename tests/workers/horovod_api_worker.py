"""Every Horovod collective of hvdllm.torch / hvdllm.tensorflow against a numpy reference of the same inputs.

Each rank rebuilds every rank's inputs from seeds, so it computes the exact expected result itself and
reports the cases it checked and any mismatch. Run as `<launcher> python horovod_api_worker.py torch|tensorflow`
(TF has Horovod's TF names only: no async handles or in-place forms).
"""
from __future__ import annotations

import os
import sys
import traceback

import numpy as np

from common import launched_size, leave_together, start

from hvdllm.core.collectives import split_rows

TORCH = sys.argv[1:] != ["tensorflow"]
if TORCH:
    import torch

    import hvdllm.torch as hvd
else:
    import tensorflow as tf

    import hvdllm.tensorflow as hvd

SUBSET = list(range(max(1, launched_size() - 1)))  # ranks [0..n-2]: a proper subset from 2 ranks on
r, n = start(hvd, [SUBSET])
PS = hvd.ProcessSet(SUBSET)
checked: list[str] = []
failures: list[str] = []

NP_OPS = {"Average": lambda a: np.mean(a, axis=0), "Sum": lambda a: np.sum(a, axis=0),
          "Min": lambda a: np.min(a, axis=0), "Max": lambda a: np.max(a, axis=0),
          "Product": lambda a: np.prod(a, axis=0)}


def inp(rank: int, shape: tuple, seed: int, dtype: str = "float64") -> np.ndarray:
    """Rank ``rank``'s input of case ``seed``: floats in [0.5, 1.5) (products stay tame), small ints."""
    rng = np.random.default_rng([seed, rank])
    if dtype.startswith("int"):
        return rng.integers(-3, 4, size=shape).astype(dtype)
    return (rng.random(shape) + 0.5).astype(dtype)


def all_inputs(shape_of, seed: int, ranks=None, dtype: str = "float64") -> list[np.ndarray]:
    return [inp(q, shape_of(q), seed, dtype) for q in (range(n) if ranks is None else ranks)]


def check(name: str, got, want, tol: float = 1e-12) -> None:
    """Record one case; exact for ints, float64 sums of <= 3 terms in any order agree to ~1e-15."""
    checked.append(name)
    try:
        got = [np.asarray(g) for g in got] if isinstance(got, (list, tuple)) else np.asarray(got)
        want = [np.asarray(w) for w in want] if isinstance(want, (list, tuple)) else np.asarray(want)
        for g, w in zip(*(([got], [want]) if isinstance(got, np.ndarray) else (got, want))):
            assert g.shape == w.shape, f"shape {g.shape} != {w.shape}"
            np.testing.assert_allclose(g, w, rtol=tol, atol=0)
        if not isinstance(got, np.ndarray):
            assert len(got) == len(want), f"{len(got)} results != {len(want)}"
    except Exception as e:  # noqa: BLE001 - every mismatch is reported, the run continues
        failures.append(f"{name}: {type(e).__name__}: {e}")


def t(a: np.ndarray):
    return torch.from_numpy(a.copy()) if TORCH else tf.constant(a)


def run(name: str, fn) -> None:
    """A case whose body raises is a failure, not a crash (every rank runs every case regardless)."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        failures.append(f"{name}: {traceback.format_exc(limit=3)}")


def reduce_cases() -> None:
    shape = lambda q: (3, 2)  # noqa: E731
    for i, (op_name, ref) in enumerate(NP_OPS.items()):
        xs = all_inputs(shape, 100 + i)
        check(f"allreduce_{op_name}", hvd.allreduce(t(xs[r]), op=getattr(hvd, op_name)), ref(np.stack(xs)))
        if op_name != "Average":
            ints = all_inputs(shape, 200 + i, dtype="int32")
            check(f"allreduce_int_{op_name}", hvd.allreduce(t(ints[r]), op=getattr(hvd, op_name)),
                  ref(np.stack(ints)))
        rs = all_inputs(lambda q: (2 * n + 1, 2), 300 + i)
        if op_name in ("Average", "Sum"):
            rows = split_rows(2 * n + 1, n)
            got = hvd.reducescatter(t(rs[r]), op=getattr(hvd, op_name))
            check(f"reducescatter_{op_name}", got, ref(np.stack(rs))[sum(rows[:r]):sum(rows[:r + 1])])
        else:   # Horovod's reducescatter has Average and Sum only; every backend says so before any op
            checked.append(f"reducescatter_{op_name}")
            try:
                hvd.reducescatter(t(rs[r]), op=getattr(hvd, op_name))
                failures.append(f"reducescatter_{op_name}: no error raised")
            except ValueError as e:
                if "hvd.Average or hvd.Sum" not in str(e):
                    failures.append(f"reducescatter_{op_name}: unclear message {e}")
    xs = np.stack(all_inputs(shape, 400))
    check("average_true", hvd.allreduce(t(xs[r]), average=True), xs.mean(0))
    check("average_false", hvd.allreduce(t(xs[r]), average=False), xs.sum(0))
    check("scaled_sum", hvd.allreduce(t(xs[r]), op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25),
          (2.0 * xs).sum(0) * 0.25)
    check("scaled_average", hvd.allreduce(t(xs[r]), prescale_factor=3.0, postscale_factor=0.5),
          (3.0 * xs).sum(0) / n * 0.5)
    rs = np.stack(all_inputs(lambda q: (n + 2, 3), 410))
    rows = split_rows(n + 2, n)
    check("reducescatter_scaled",
          hvd.reducescatter(t(rs[r]), op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5),
          (2.0 * rs).sum(0)[sum(rows[:r]):sum(rows[:r + 1])] * 0.5)
    a, b = np.stack(all_inputs(lambda q: (n + 1,), 420)), np.stack(all_inputs(lambda q: (2, n), 421))
    sl = lambda m, q: m[sum(split_rows(len(m), n)[:q]):sum(split_rows(len(m), n)[:q + 1])]  # noqa: E731
    check("grouped_reducescatter", hvd.grouped_reducescatter([t(a[r]), t(b[r])], op=hvd.Sum),
          [sl(a.sum(0), r), sl(b.sum(0), r)])
    if TORCH:
        check("reducescatter_async", hvd.synchronize(hvd.reducescatter_async(t(a[r]))), sl(a.mean(0), r))
    if n == 2 and hvd.backend() == "horovod" and hvd.mpi_enabled():   # Adasum of two vectors, Horovod's formula
        x, y = xs[0].ravel(), xs[1].ravel()
        d = x @ y
        want = (1 - d / (2 * (x @ x))) * x + (1 - d / (2 * (y @ y))) * y
        check("adasum", hvd.allreduce(t(xs[r]), op=hvd.Adasum).reshape(-1), want)
    elif not hvd.mpi_enabled() or hvd.backend() != "horovod":   # needs Horovod's MPI ops: a clear error
        checked.append("adasum_error")
        try:
            hvd.allreduce(t(xs[r]), op=hvd.Adasum)
            failures.append("adasum_error: no error raised")
        except ValueError as e:
            if "horovod backend" not in str(e) and "horovodrun --mpi" not in str(e):
                failures.append(f"adasum_error: unclear message {e}")


def async_cases() -> None:
    xs = np.stack(all_inputs(lambda q: (4,), 500))
    ys = np.stack(all_inputs(lambda q: (2, 3), 501))
    check("grouped_allreduce", hvd.grouped_allreduce([t(xs[r]), t(ys[r])], op=hvd.Sum), [xs.sum(0), ys.sum(0)])
    if not TORCH:
        return
    h = hvd.allreduce_async(t(xs[r]), op=hvd.Sum, name="api.async")
    hvd.poll(h)   # may be True or False; must not fail
    check("allreduce_async", hvd.synchronize(h), xs.sum(0))
    inplace = t(xs[r])
    out = hvd.allreduce_(inplace, op=hvd.Max)
    check("allreduce_", [inplace, out], [xs.max(0), xs.max(0)])
    inplace = t(xs[r])
    hvd.synchronize(hvd.allreduce_async_(inplace, op=hvd.Min))
    check("allreduce_async_", inplace, xs.min(0))
    check("grouped_allreduce_async",
          hvd.synchronize(hvd.grouped_allreduce_async([t(xs[r]), t(ys[r])])), [xs.mean(0), ys.mean(0)])
    pair = [t(xs[r]), t(ys[r])]
    hvd.grouped_allreduce_(pair, op=hvd.Product)
    check("grouped_allreduce_", pair, [xs.prod(0), ys.prod(0)])
    pair = [t(xs[r]), t(ys[r])]
    hvd.synchronize(hvd.grouped_allreduce_async_(pair, op=hvd.Sum, postscale_factor=2.0))
    check("grouped_allreduce_async_", pair, [xs.sum(0) * 2, ys.sum(0) * 2])


def gather_cases() -> None:
    gs = all_inputs(lambda q: (q + 1, 2), 600)           # uneven first dimensions
    hs = all_inputs(lambda q: (2 * q + 1,), 601)
    check("allgather_uneven", hvd.allgather(t(gs[r])), np.concatenate(gs))
    check("grouped_allgather", hvd.grouped_allgather([t(gs[r]), t(hs[r])]), [np.concatenate(gs), np.concatenate(hs)])
    objs = hvd.allgather_object({"rank": r, "sq": r * r})
    checked.append("allgather_object")
    if objs != [{"rank": q, "sq": q * q} for q in range(n)]:
        failures.append(f"allgather_object: {objs}")
    if not TORCH:
        return
    check("allgather_async", hvd.synchronize(hvd.allgather_async(t(gs[r]))), np.concatenate(gs))
    check("grouped_allgather_async", hvd.synchronize(hvd.grouped_allgather_async([t(hs[r])])), [np.concatenate(hs)])
    bs = all_inputs(lambda q: (3,), 610)
    check("broadcast_async", hvd.synchronize(hvd.broadcast_async(t(bs[r]), root_rank=n - 1)), bs[n - 1])
    mine = t(bs[r])
    hvd.synchronize(hvd.broadcast_async_(mine, root_rank=0))
    check("broadcast_async_", mine, bs[0])
    mine = t(bs[r])
    hvd.broadcast_(mine, n - 1)
    check("broadcast_", mine, bs[n - 1])


def alltoall_cases() -> None:
    xs = all_inputs(lambda q: (2 * n, 3), 700)
    got = hvd.alltoall(t(xs[r]))
    check("alltoall_even", got, np.concatenate([x[2 * r:2 * r + 2] for x in xs]))
    split = lambda src, dst: (src + 2 * dst) % 3            # noqa: E731 - zeros included
    ys = all_inputs(lambda q: (sum(split(q, d) for d in range(n)), 2), 701)
    out, received = hvd.alltoall(t(ys[r]), splits=[split(r, d) for d in range(n)])
    offs = lambda src, dst: sum(split(src, d) for d in range(dst))  # noqa: E731
    want = np.concatenate([ys[s][offs(s, r):offs(s, r) + split(s, r)] for s in range(n)])
    check("alltoall_splits", [out, received], [want, np.array([split(s, r) for s in range(n)])])
    if not TORCH:
        return
    out, received = hvd.synchronize(hvd.alltoall_async(t(ys[r]), splits=torch.tensor([split(r, d) for d in range(n)],
                                                                                      dtype=torch.int32)))
    check("alltoall_async", [out, received], [want, np.array([split(s, r) for s in range(n)])])


def process_set_cases() -> None:
    if r not in SUBSET:
        return
    m = len(SUBSET)
    xs = np.stack(all_inputs(lambda q: (3,), 800, SUBSET))
    check("ps_allreduce_max", hvd.allreduce(t(xs[r]), op=hvd.Max, process_set=PS), xs.max(0))
    if TORCH:
        check("ps_allreduce_async", hvd.synchronize(hvd.allreduce_async(t(xs[r]), op=hvd.Sum, process_set=PS)),
              xs.sum(0))
    gs = all_inputs(lambda q: (q + 1,), 801, SUBSET)
    check("ps_allgather", hvd.allgather(t(gs[r]), process_set=PS), np.concatenate(gs))
    rs = np.stack(all_inputs(lambda q: (m + 1, 2), 802, SUBSET))
    rows = split_rows(m + 1, m)
    check("ps_reducescatter", hvd.reducescatter(t(rs[r]), op=hvd.Sum, process_set=PS),
          rs.sum(0)[sum(rows[:r]):sum(rows[:r + 1])])
    zs = all_inputs(lambda q: (m, 2), 803, SUBSET)
    check("ps_alltoall", hvd.alltoall(t(zs[r]), process_set=PS), np.concatenate([z[r:r + 1] for z in zs]))
    check("ps_object", hvd.allgather_object(r, process_set=PS), SUBSET)


def join_cases() -> None:
    """Uneven batches: rank q runs q + 1 steps, then joins; joined ranks contribute zeros (Horovod) to
    allreduces and take part in broadcasts from an active root; join returns the last rank to join."""
    sums, casts = [], []
    serves_broadcast = hvd.backend() != "horovod"    # Horovod 0.28.1: "Broadcast is not supported with Join"
    for k in range(r + 1):
        sums.append(np.asarray(hvd.allreduce(t(np.ones(2)), op=hvd.Sum, name=f"join.step{k}")).tolist())
        if serves_broadcast:
            x = t(np.full(3, float(r * 10 + k)))
            casts.append(np.asarray(hvd.broadcast(x, n - 1, name=f"join.bcast{k}")).tolist())
    last = hvd.join()
    check("join_sums", np.array(sums), np.array([[float(n - k)] * 2 for k in range(r + 1)]))
    if serves_broadcast:
        check("join_broadcast", np.array(casts), np.array([[float((n - 1) * 10 + k)] * 3 for k in range(r + 1)]))
    check("join_last", np.array(last), np.array(n - 1))
    if TORCH:
        join_optimizer()
    if hvd.backend() == "mpi" and n > 1:
        join_unsupported()


def join_unsupported() -> None:
    """mpi backend: after a rank joined, an op joined ranks cannot serve raises (no hang), naming those
    that work; the caller then joins too. Rank 0 joins at once; the others allreduce first (which rank 0
    serves, so they have seen its join) and then try an allgather."""
    checked.append("join_unsupported")
    if r == 0:
        hvd.join()
        return
    hvd.allreduce(t(np.ones(1)), op=hvd.Sum, name="join.unsupported")
    try:
        hvd.allgather(t(np.ones(1)))
        failures.append("join_unsupported: allgather after a join did not raise")
    except RuntimeError as e:
        if "allreduce, broadcast, barrier" not in str(e):
            failures.append(f"join_unsupported: unclear message {e}")
    hvd.join()


def join_optimizer() -> None:
    """DistributedOptimizer (op=Sum) with uneven batches: rank q steps q + 2 times, then joins; each step's
    update is the sum of the gradients of the ranks still training (joined ranks add zeros)."""
    w_ref = np.array([0.5, -1.0])
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w_ref]))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Sum,
                                   named_parameters=model.named_parameters())

    def x_of(q: int, k: int) -> np.ndarray:
        return np.array([[1.0 + q, 0.5 * k], [k - q, 1.0]])

    for k in range(r + 2):
        opt.zero_grad()
        (model(torch.tensor(x_of(r, k), dtype=torch.float32)) ** 2).sum().backward()
        opt.step()
    hvd.join()
    for k in range(r + 2):       # this rank's steps; at step k rank q has a batch while k < q + 2
        grad = sum(2 * x_of(q, k).T @ (x_of(q, k) @ w_ref) for q in range(n) if k < q + 2)
        w_ref = w_ref - 0.1 * grad
    check("join_optimizer", model.weight.detach().numpy().reshape(-1), w_ref.astype(np.float32), tol=1e-4)


def query_cases() -> None:
    checked.append("queries")
    gloo = "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ
    want = {"cross_rank": 0, "cross_size": 1, "is_homogeneous": True,
            "mpi_enabled": not gloo and hvd.backend() != "local", "gloo_enabled": gloo,
            "global_process_set": hvd.WORLD}
    got = {"cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(), "is_homogeneous": hvd.is_homogeneous(),
           "mpi_enabled": hvd.mpi_enabled(), "gloo_enabled": hvd.gloo_enabled(),
           "global_process_set": hvd.global_process_set}
    if got != want:
        failures.append(f"queries: {got} != {want}")
    for q in ("mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built",
              "mpi_threads_supported"):
        if not isinstance(getattr(hvd, q)(), bool):
            failures.append(f"queries: {q}() is not a bool")
    if not issubclass(hvd.HorovodInternalError, Exception):
        failures.append("queries: HorovodInternalError is not an exception type")


for case in (reduce_cases, async_cases, gather_cases, alltoall_cases, process_set_cases, join_cases, query_cases):
    run(case.__name__, case)
leave_together(hvd, r, {"rank": r, "size": n, "backend": hvd.backend(), "checked": checked, "failures": failures})
