"""hvdllm.core.zero: the ZeRO partition of gradient buckets, on hand-computed cases; stage parsing."""
from __future__ import annotations

import pytest

from hvdllm.core.buckets import Bucket, TensorSpec, plan_buckets
import math

from hvdllm.core.zero import PassTracker, Piece, ShardPlan, parse_inflight_mb, parse_stage, pieces


def test_shard_plan_pads_to_a_multiple_of_the_ranks() -> None:
    p = ShardPlan(10, 4)        # ceil(10/4) = 3 per rank, 12 with padding
    assert (p.shard_numel, p.padded_numel) == (3, 12)
    assert [p.range(r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    q = ShardPlan(2, 4)         # fewer elements than ranks: the last ranks own only padding
    assert q.shard_numel == 1 and [q.range(r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert ShardPlan(8, 2).range(1) == (4, 8) and ShardPlan(8, 1).range(0) == (0, 8)


def test_pieces_cut_a_bucket_across_tensor_boundaries() -> None:
    # tensors 0 (6 elements), 1 (3), 2 (4) in a bucket laid out 2, 1, 0 (reverse registration order)
    bucket = Bucket("float32", (2, 1, 0), (0, 4, 7), 13)
    sizes = [6, 3, 4]
    plan = ShardPlan(13, 3)     # 5 per rank: [0,5) [5,10) [10,13)+2 padding
    assert pieces(bucket, sizes, plan, 0) == (Piece(2, 0, 0, 4), Piece(1, 0, 4, 1))
    assert pieces(bucket, sizes, plan, 1) == (Piece(1, 1, 0, 2), Piece(0, 0, 2, 3))
    assert pieces(bucket, sizes, plan, 2) == (Piece(0, 3, 0, 3),)
    # every element of every tensor lands in exactly one shard
    covered = sorted((pc.index, pc.start + j) for r in range(3) for pc in pieces(bucket, sizes, plan, r)
                     for j in range(pc.length))
    assert covered == sorted((i, j) for i, n in enumerate(sizes) for j in range(n))


def test_piece_slices_copy_a_shard_out_of_its_tensors_and_back() -> None:
    """The copy arithmetic every adapter uses (in_tensor, in_shard): shards filled from flat tensors hold
    the bucket's range, and copied back they rebuild every tensor."""
    import numpy as np

    bucket = Bucket("float32", (2, 1, 0), (0, 4, 7), 13)
    sizes = [6, 3, 4]
    tensors = [np.arange(n, dtype=np.float32) + 100 * i for i, n in enumerate(sizes)]
    flat_bucket = np.concatenate([tensors[2], tensors[1], tensors[0]])
    plan = ShardPlan(13, 3)
    rebuilt = [np.full(n, -1.0, dtype=np.float32) for n in sizes]
    for r in range(3):
        shard = np.zeros(plan.shard_numel, dtype=np.float32)
        own = pieces(bucket, sizes, plan, r)
        for pc in own:
            shard[pc.in_shard] = tensors[pc.index][pc.in_tensor]
        lo, hi = plan.range(r)
        assert (shard[:hi - lo] == flat_bucket[lo:hi]).all() and (shard[hi - lo:] == 0).all()
        for pc in own:
            rebuilt[pc.index][pc.in_tensor] = shard[pc.in_shard]
    assert all((a == b).all() for a, b in zip(rebuilt, tensors))


def test_pieces_follow_the_core_bucket_plan() -> None:
    specs = [TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (5,), "float32")]
    (bucket,) = plan_buckets(specs, 0)
    plan = ShardPlan(bucket.numel, 2)       # b first (offset 0, 5 elements), then a (offset 5, 6)
    assert pieces(bucket, [6, 5], plan, 0) == (Piece(1, 0, 0, 5), Piece(0, 0, 5, 1))
    assert pieces(bucket, [6, 5], plan, 1) == (Piece(0, 1, 0, 5),)


@pytest.mark.parametrize("bad", [3, -1, "x", 1.0, True, None])
def test_bad_stages_are_refused_in_one_line(bad: object) -> None:
    with pytest.raises(ValueError, match=r"zero_stage=.*allowed: 0 .*1 .*2") as e:
        parse_stage(bad)
    assert "\n" not in str(e.value)


def test_good_stages_and_bad_plans() -> None:
    assert [parse_stage(s) for s in (0, 1, 2)] == [0, 1, 2]
    with pytest.raises(ValueError, match="ranks=0"):
        ShardPlan(4, 0)
    with pytest.raises(ValueError, match="rank=2"):
        ShardPlan(4, 2).range(2)


def test_pass_tracker_launches_each_bucket_once_per_pass() -> None:
    """Buckets {0, 1} and {2}, 2 passes: a bucket's pass m starts once all its tensors have m + 1 gradients."""
    t = PassTracker([(0, 1), (2,)], 3, passes=2, ordered=False)
    assert t.mark(2) == [(1, 0)]                # bucket 1 complete for pass 0 at once
    assert t.mark(0) == [] and t.mark(1) == [(0, 0)]
    assert t.mark(2) == [(1, 1)] and t.mark(1) == [] and t.mark(0) == [(0, 1)]
    assert t.remaining() == []
    t.reset()
    assert t.mark(0) == [] and t.mark(0) == []    # tensor 1 missing in pass 0: bucket 0 is held back ...
    assert t.mark(1) == [(0, 0)]                # ... and sends pass 0 (carrying both passes of tensor 0)
    assert t.remaining() == [(1, 0), (0, 1), (1, 1)]   # the rest at step(), in (pass, bucket) order
    assert t.remaining() == []


def test_pass_tracker_in_order_waits_for_earlier_launches() -> None:
    """ordered=True (MPI matches collectives by order): strictly (pass, bucket) order on every rank."""
    t = PassTracker([(0,), (1,)], 2, passes=2, ordered=True)
    assert t.mark(1) == []                      # bucket 1 is ready, but bucket 0's pass 0 comes first
    assert t.mark(0) == [(0, 0), (1, 0)]
    assert t.mark(1) == []                      # pass 1 of bucket 1 waits for bucket 0's
    assert t.mark(0) == [(0, 1), (1, 1)]
    t.reset()
    assert t.mark(0) == [(0, 0)] and t.remaining() == [(1, 0), (0, 1), (1, 1)]


def test_pass_tracker_sends_every_launch_exactly_once_whatever_the_gradients() -> None:
    """Any pattern of gradients on a rank: marks then remaining() hand out each (bucket, pass) once."""
    import random

    rng = random.Random(0)
    buckets = [(0, 1, 2), (3,), (4, 5)]
    for ordered in (False, True):
        for _ in range(50):
            passes = rng.randint(1, 3)
            t = PassTracker(buckets, 6, passes, ordered)
            sent = []
            for _ in range(passes):
                for i in rng.sample(range(6), rng.randint(0, 6)):
                    sent += t.mark(i)
            sent += t.remaining()
            assert sorted(sent) == sorted((b, m) for b in range(3) for m in range(passes))
            for b in range(3):                  # a bucket's passes go out in order
                assert [m for bb, m in sent if bb == b] == list(range(passes))
            if ordered:
                assert sent == sorted(sent, key=lambda x: (x[1], x[0]))


def test_inflight_mb_parsing() -> None:
    assert parse_inflight_mb(None, 1) is None and parse_inflight_mb(None, 2) is None
    assert parse_inflight_mb(0, 2) == 0.0 and parse_inflight_mb(2.5, 2) == 2.5
    assert parse_inflight_mb(math.inf, 2) == math.inf
    for bad in (-1, math.nan, "1", True):
        with pytest.raises(ValueError, match=r"zero_inflight_mb=.* must be a number >= 0") as e:
            parse_inflight_mb(bad, 2)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"zero_inflight_mb=4 applies to zero_stage=2 only; allowed with "
                                         r"zero_stage=1: None"):
        parse_inflight_mb(4, 1)
