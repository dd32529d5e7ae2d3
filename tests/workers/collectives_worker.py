"""Every basic collective on one framework; run as `<launcher> python collectives_worker.py torch|tensorflow`."""
from __future__ import annotations

import sys

from common import report, start

framework = sys.argv[1]
out: dict = {}

if framework == "torch":
    import torch

    import hvdllm.torch as hvd

    r, n = start(hvd, [[0]], threads=None)
    x = torch.arange(4, dtype=torch.float32) + 10 * r
    out["avg"] = hvd.allreduce(x).tolist()
    out["avg_default_op"] = hvd.allreduce(x, op=hvd.Average).tolist()
    out["sum"] = hvd.allreduce(x, op=hvd.Sum).tolist()
    out["x_unchanged"] = x.tolist()
    out["sum_int"] = hvd.allreduce(torch.tensor([r + 1], dtype=torch.int64), op=hvd.Sum).tolist()
    out["sum_bf16"] = hvd.allreduce(torch.full((3,), 1.5 + r, dtype=torch.bfloat16), op=hvd.Sum).float().tolist()
    y = x.clone()
    hvd.allreduce_async_(y, op=hvd.Sum).wait()
    out["async_sum"] = y.tolist()
    out["bcast"] = hvd.broadcast(torch.full((2, 2), float(r)), root_rank=n - 1).tolist()
    out["gather"] = hvd.allgather(torch.full((r + 1, 2), float(r))).tolist()
    out["gather_scalar"] = hvd.allgather(torch.tensor(float(r))).tolist()
    out["object"] = hvd.broadcast_object({"from": r, "list": [r] * 3}, root_rank=0)
    out["object_from_none"] = hvd.broadcast_object({"from": r} if r == 0 else None, root_rank=0)  # the usual idiom
    if hvd.backend() == "horovod":   # Horovod's blocking ops are differentiable; hvdllm keeps that
        w = torch.full((2,), float(r + 1), requires_grad=True)
        (hvd.allreduce(w, op=hvd.Sum) * (r + 1)).sum().backward()
        out["grad_of_sum"] = w.grad.tolist()
    if r == 0:
        out["set0"] = hvd.allreduce(torch.tensor([5.0 + r]), op=hvd.Sum, process_set=hvd.ProcessSet([0])).tolist()
    # Rank 0 has issued one op more than the others (set0): Horovod's automatic names for unnamed ops now
    # differ across ranks, so these only meet because hvd.* forwards name= (the pipeline's situation).
    out["named_sum"] = hvd.allreduce(x, op=hvd.Sum, name="test.named.sum").tolist()
    out["named_bcast"] = hvd.broadcast(torch.full((2,), float(r)), root_rank=n - 1, name="test.named.bcast").tolist()
    out["named_gather"] = hvd.allgather(torch.full((1,), float(r)), name="test.named.gather").tolist()
    out["named_grouped"] = [t.tolist() for t in hvd.grouped_allreduce(
        [x, torch.full((2,), 1.5, dtype=torch.bfloat16)], op=hvd.Sum, name="test.named.grouped")]
    y = x.clone()
    hvd.allreduce_async_(y, op=hvd.Sum, name="test.named.async").wait()
    out["named_async"] = y.tolist()
    out["named_object"] = hvd.broadcast_object(r, root_rank=n - 1, name="test.named.object")
    hvd.barrier()
else:
    import tensorflow as tf

    import hvdllm.tensorflow as hvd

    r, n = start(hvd, threads=None)
    x = tf.range(4, dtype=tf.float32) + 10.0 * r
    out["avg"] = hvd.allreduce(x).numpy().tolist()
    out["avg_default_op"] = hvd.allreduce(x, op=hvd.Average).numpy().tolist()
    out["sum"] = hvd.allreduce(x, op=hvd.Sum).numpy().tolist()
    out["x_unchanged"] = x.numpy().tolist()
    out["sum_int"] = hvd.allreduce(tf.constant([r + 1], dtype=tf.int64), op=hvd.Sum).numpy().tolist()
    out["sum_bf16"] = tf.cast(hvd.allreduce(tf.fill([3], tf.constant(1.5 + r, tf.bfloat16)), op=hvd.Sum),
                              tf.float32).numpy().tolist()
    y = hvd.grouped_allreduce([x, tf.ones([2]) * r], op=hvd.Sum)
    out["async_sum"] = y[0].numpy().tolist()
    out["grouped_second"] = y[1].numpy().tolist()
    out["bcast"] = hvd.broadcast(tf.fill([2, 2], float(r)), root_rank=n - 1).numpy().tolist()
    out["gather"] = hvd.allgather(tf.fill([r + 1, 2], float(r))).numpy().tolist()
    out["gather_scalar"] = hvd.allgather(tf.constant(float(r))).numpy().tolist()
    out["object"] = hvd.broadcast_object({"from": r, "list": [r] * 3}, root_rank=0)
    out["object_from_none"] = hvd.broadcast_object({"from": r} if r == 0 else None, root_rank=0)  # the usual idiom

    @tf.function
    def in_graph(v):
        return hvd.allreduce(v, op=hvd.Sum), hvd.broadcast(v, root_rank=0)

    out["named_sum"] = hvd.allreduce(x, op=hvd.Sum, name="test.named.sum").numpy().tolist()
    out["named_bcast"] = hvd.broadcast(tf.fill([2], float(r)), root_rank=n - 1, name="test.named.bcast").numpy().tolist()
    out["named_gather"] = hvd.allgather(tf.fill([1], float(r)), name="test.named.gather").numpy().tolist()
    out["named_grouped"] = [t.numpy().tolist() for t in hvd.grouped_allreduce(
        [x, tf.fill([2], tf.constant(1.5, tf.bfloat16))], op=hvd.Sum, name="test.named.grouped")]
    out["named_async"] = hvd.collectives().allreduce_async_(x, hvd.Sum, name="test.named.async").wait().numpy().tolist()
    out["named_object"] = hvd.broadcast_object(r, root_rank=n - 1, name="test.named.object")

    s, b = in_graph(x)
    out["graph_sum"] = s.numpy().tolist()
    out["graph_bcast"] = b.numpy().tolist()
    hvd.barrier()

out.update(rank=r, size=n, local_rank=hvd.local_rank(), local_size=hvd.local_size(), backend=hvd.backend())
report(r, out)
