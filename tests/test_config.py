"""The training config's schema: fields carry their rules, one coercion walks them, TOML round trips."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from hvdllm.core.grid import ProcessGrid
from hvdllm.train import config as C

ALL_SPECS = [s for specs in C.SPECS.values() for s in specs.values()]
NUMERIC = [s for s in ALL_SPECS if s.base in (int, float)]


def test_every_key_has_help_and_its_default_is_allowed() -> None:
    assert len(ALL_SPECS) == sum(len(dataclasses.fields(cls)) for cls in C.SECTIONS.values()) > 40
    for s in ALL_SPECS:
        assert s.knob.help and s.allowed(), s.key
        assert s.coerce(s.default) == s.default, s.key
        if s.default is None:
            assert s.optional and s.knob.none, s.key          # None says what it means


@pytest.mark.parametrize("spec", [s for s in NUMERIC if s.base is float], ids=lambda s: s.key)
def test_every_float_rejects_inf_and_nan(spec: C.FieldSpec) -> None:
    for bad in (math.inf, -math.inf, math.nan, "inf", "-Infinity", "nan"):
        with pytest.raises(C.ConfigError, match=f"^{spec.key}=.*(inf|nan).* is not finite; allowed: a finite float"):
            spec.coerce(bad)


@pytest.mark.parametrize("spec", [s for s in NUMERIC if s.knob.lo is not None or s.knob.hi is not None],
                         ids=lambda s: s.key)
def test_every_bounded_number_rejects_just_outside_and_accepts_the_bound(spec: C.FieldSpec) -> None:
    k = spec.knob
    step = 1 if spec.base is int else 1e-9
    for bound, open_, outside in ((k.lo, k.lo_open, -step), (k.hi, k.hi_open, step)):
        if bound is None:
            continue
        bad = spec.base(bound) if open_ else spec.base(bound + outside)
        with pytest.raises(C.ConfigError, match="is out of range; allowed: .*" + re.escape(k.range_text())):
            spec.coerce(bad)
        if not open_:
            assert spec.coerce(spec.base(bound)) == bound


def test_coercion_of_strings_and_types() -> None:
    fused, lr, steps, exit_at = (C.spec(k) for k in ("optim.fused", "optim.lr", "run.max_steps", "run.exit_at_step"))
    assert [fused.coerce(v) for v in ("yes", "ON", "1", "false", " off ", True)] == [True] * 3 + [False] * 2 + [True]
    assert lr.coerce("3e-4") == 3e-4 and lr.coerce(2) == 2.0 and isinstance(lr.coerce(2), float)
    assert steps.coerce(" 12 ") == 12 and exit_at.coerce("none") is None and exit_at.coerce(None) is None
    with pytest.raises(C.ConfigError, match="optim.lr=1000.* is not finite"):
        lr.coerce(10**400)
    for spec, bad in ((steps, 2.0), (steps, True), (steps, "1e3"), (lr, True), (fused, 1), (fused, "maybe"),
                      (steps, None), (C.spec("run.out"), 5)):
        with pytest.raises(C.ConfigError, match=r"^\S+=.* is not (a|an) (int|float|bool|str)|is not allowed"):
            spec.coerce(bad)


def test_config_is_frozen() -> None:
    cfg = C.build([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.max_steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = C.RunSection()  # type: ignore[misc]


def test_toml_round_trip_of_awkward_values(tmp_path: Path) -> None:
    cfg = C.build([C.parse_sets([
        'sample.prompt=He said "hi"\\ \t\u00e9\u4e2d\U0001F600\x7f\x01\n', "optim.eps=1e-12", "optim.max_grad_norm=none",
        "run.peak_flops=1.5e14", "run.exit_at_step=7", "data.path=some dir/with 'quotes'", "model.dropout=0.1",
        "model.bias=false", "run.seed=2147483647", "optim.fused=yes", "data.seq_len=64"])])
    for c in (cfg, C.resolved(cfg, 300)):
        path = tmp_path / C.SAVED_CONFIG
        path.write_text(C.to_toml(c), encoding="utf-8")
        back = C.build([C.load_file(str(path))])
        assert back == c and back.sample.prompt == cfg.sample.prompt
        assert C.from_dict(c.to_dict()) == c
    assert C.resolved(cfg, 300).model.vocab_size == 300 and C.resolved(cfg, 300).data.seq_len == 64


def test_saved_layer_drops_per_invocation_keys(tmp_path: Path) -> None:
    cfg = C.build([{"run.exit_at_step": 3, "run.resume": True, "run.out": "elsewhere", "optim.lr": 0.5}])
    (tmp_path / C.SAVED_CONFIG).write_text(C.to_toml(cfg))
    layer = C.saved_layer(str(tmp_path))
    assert layer["optim.lr"] == 0.5 and not set(C.NOT_INHERITED) & set(layer)
    assert C.saved_layer(str(tmp_path / "none")) == {}


def test_plan_owns_the_grid_and_uses_the_core_rule() -> None:
    cfg = C.build([{"parallel.tp": 2, "batch.global_batch": 8, "batch.micro_batch": 2}])
    p = C.plan(cfg, 4)
    assert p.grid == ProcessGrid(dp=2, tp=2, pp=1, world_size=4) and p.dp_size == 2 and p.world_size == 4
    assert p.accum == 2 and p.per_rank == 4
    with pytest.raises(C.ConfigError, match=r"^--tp 2 --pp 1: tp=2 x pp=1 = 2 does not divide the world size 3"):
        C.plan(cfg, 3)
