"""ProcessGrid: validation, rank <-> coordinates, and the groups handed to init(process_sets=...)."""
from __future__ import annotations

import itertools

import pytest

from hvdllm.core.grid import Group, ProcessGrid
from hvdllm.core.process_sets import WORLD, ProcessSet


@pytest.mark.parametrize("dp,tp,pp", [(1, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2), (3, 2, 1), (1, 4, 2)])
def test_coords_roundtrip_and_groups_partition_the_world(dp: int, tp: int, pp: int) -> None:
    g = ProcessGrid(dp, tp, pp, world_size=dp * tp * pp)
    seen = set()
    for r in g:
        c = g.coords(r)
        assert g.rank_of(c.dp, c.tp, c.pp) == r
        seen.add((c.dp, c.tp, c.pp))
        # Every group contains the rank, and its members differ only in that group's coordinate.
        for kind, field in (("dp", "dp"), ("tp", "tp"), ("pp", "pp")):
            members = getattr(g, f"{kind}_members")(r)
            assert r in members and len(members) == getattr(g, kind)
            for m in members:
                cm = g.coords(m)
                for other in {"dp", "tp", "pp"} - {field}:
                    assert getattr(cm, other) == getattr(c, other)
    assert seen == set(itertools.product(range(dp), range(tp), range(pp)))
    for kind in ("dp", "tp", "pp"):
        groups = g.all_members(kind)
        assert sorted(r for m in groups for r in m) == list(range(g.size))


def test_megatron_layout_tp_adjacent() -> None:
    g = ProcessGrid(2, 2, 2)
    assert g.tp_members(0) == (0, 1) and g.tp_members(2) == (2, 3)
    assert g.dp_members(0) == (0, 2) and g.dp_members(5) == (5, 7)
    assert g.pp_members(1) == (1, 5)
    assert g.coords(6).__dict__ == {"dp": 1, "tp": 0, "pp": 1}
    assert g.all_members("link") == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_process_sets_dedup_and_world() -> None:
    g = ProcessGrid(1, 2, 1, world_size=2)
    assert g.tp_group(0) == WORLD and g.process_sets() == []
    assert g.dp_group(1) == ProcessSet([1])            # one-rank group: not registered, no collectives
    g = ProcessGrid(2, 2, 1, world_size=4)
    assert g.process_sets() == [ProcessSet([0, 1]), ProcessSet([2, 3]), ProcessSet([0, 2]), ProcessSet([1, 3])]
    g = ProcessGrid(1, 2, 2, world_size=4)
    sets = g.process_sets()
    assert len(sets) == len(set(sets))
    assert ProcessSet([0, 2]) in sets and ProcessSet([1, 3]) in sets          # pp == link == embedding
    g3 = ProcessGrid(1, 1, 3)
    assert g3.link_group(1, 2) == ProcessSet([1, 2]) and g3.embedding_group(2) == ProcessSet([0, 2])
    assert ProcessSet([0, 2]) in g3.process_sets()


def test_group_view() -> None:
    g = ProcessGrid(2, 2, 1)
    grp = g.group("tp", 3)
    assert (grp.members, grp.index, grp.size, grp.process_set) == ((2, 3), 1, 2, ProcessSet([2, 3]))
    assert Group.single().size == 1
    assert Group.of([1, 0], 1, world_size=2) == Group(WORLD, (0, 1), 1)
    with pytest.raises(ValueError, match="not a member"):
        Group.of([0, 1], 2, world_size=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dp=1, tp=3, pp=1, world_size=4), r"tp=3 x pp=1 = 3 ranks does not match the world size 4"),
    (dict(dp=2, tp=2, pp=2, world_size=4), r"does not match the world size 4"),
    (dict(dp=0, tp=1, pp=1), r"dp=0 must be an integer >= 1"),
    (dict(dp=1, tp=1.5, pp=1), r"tp=1.5 must be an integer >= 1"),
])
def test_bad_grid_is_one_line_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        ProcessGrid(**kwargs)
    assert "\n" not in str(e.value)


def test_infer() -> None:
    assert ProcessGrid.infer(8, tp=2, pp=2) == ProcessGrid(2, 2, 2, 8)
    with pytest.raises(ValueError, match=r"tp=3 x pp=1 = 3 does not divide the world size 4"):
        ProcessGrid.infer(4, tp=3)
    with pytest.raises(ValueError, match="outside the grid"):
        ProcessGrid(1, 2, 1).coords(2)
    with pytest.raises(ValueError, match="not adjacent"):
        ProcessGrid(1, 1, 3).link_group(0, 2)
