"""Pipeline schedules (GPipe, 1F1B) and layer partitioning: pure functions of the core."""
from __future__ import annotations

import pytest

from hvdllm.core.pipeline import (SCHEDULES, Action, build_schedule, compute_order, ideal_bubble,
                                  partition_layers)


def _link_ops(schedule, s: int, peer: int) -> list[tuple[str, int]]:
    """The messages stage s exchanges with peer, in program order, named by (kind, mb)."""
    out = []
    for a in schedule.actions[s]:
        if a.op in ("send_act", "recv_act") and peer == s + (1 if a.op == "send_act" else -1):
            out.append(("act", a.mb))
        if a.op in ("send_grad", "recv_grad") and peer == s + (-1 if a.op == "send_grad" else 1):
            out.append(("grad", a.mb))
    return out


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("p,m", [(1, 1), (1, 3), (2, 1), (2, 4), (3, 2), (3, 8), (4, 4), (4, 16), (5, 3)])
def test_schedule_programs_are_complete_consistent_and_ideal(kind: str, p: int, m: int) -> None:
    s = build_schedule(kind, p, m)
    for st in range(p):
        comp = s.compute_order(st)
        assert sorted((a.op, a.mb) for a in comp) == sorted([("forward", i) for i in range(m)] +
                                                            [("backward", i) for i in range(m)])
        done = set()
        for a in s.actions[st]:           # inputs arrive before use, outputs are sent after they exist
            if a.op == "forward" and st > 0:
                assert ("recv_act", a.mb) in done
            if a.op == "backward" and st < p - 1:
                assert ("recv_grad", a.mb) in done and ("forward", a.mb) in done
            if a.op == "send_act":
                assert ("forward", a.mb) in done
            if a.op == "send_grad":
                assert ("backward", a.mb) in done
            done.add((a.op, a.mb))
        if st < p - 1:                    # both ends of each link agree on the message order
            assert _link_ops(s, st, st + 1) == _link_ops(s, st + 1, st)
            assert len(_link_ops(s, st, st + 1)) == 2 * m
    assert s.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert s.simulated_bubble() == pytest.approx(s.bubble_fraction)
    peaks = [s.peak_in_flight(st) for st in range(p)]
    assert peaks == ([m] * p if kind == "gpipe" else [min(p - st, m) for st in range(p)])


def test_1f1b_order() -> None:
    assert compute_order("1f1b", 2, 3, 0) == [Action("forward", 0), Action("forward", 1), Action("backward", 0),
                                               Action("forward", 2), Action("backward", 1), Action("backward", 2)]
    assert [repr(a) for a in build_schedule("1F1B", 2, 2).actions[1]] == ["rA0", "F0", "B0", "rA1", "sG0", "F1",
                                                                         "B1", "sG1"]


def test_bad_schedule_inputs() -> None:
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'; allowed: gpipe, 1f1b"):
        build_schedule("zb", 2, 4)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        ideal_bubble(2, 0)
    with pytest.raises(ValueError, match="stage 2 is outside 0..1"):
        compute_order("gpipe", 2, 2, 2)


def test_partition_balances_parameter_counts() -> None:
    assert partition_layers([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition_layers([10, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert partition_layers([1, 1, 1, 1], 2, first_extra=2) == [(0, 1), (1, 4)]
    assert partition_layers([3, 3, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    assert partition_layers([5], 1) == [(0, 1)]


def test_more_stages_than_layers_is_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"cannot split 2 layers into 3 pipeline stages; allowed: at most 2") as e:
        partition_layers([1, 1], 3)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("p,m", [(2, 4), (3, 5), (4, 16)])
def test_schedule_with_transport_latency_stays_consistent(kind: str, p: int, m: int) -> None:
    s = build_schedule(kind, p, m, forward_time=50, backward_time=100, comm_time=9)
    for st in range(p - 1):
        assert _link_ops(s, st, st + 1) == _link_ops(s, st + 1, st)
    assert s.simulated_bubble() > s.bubble_fraction
    with pytest.raises(ValueError, match="comm_time=-1"):
        build_schedule(kind, p, m, comm_time=-1)
