"""README's Horovod support table is generated from the code (tests/support_table.py) and must not drift:
the checked-in list of Horovod 0.28.1's public names matches the installed Horovod, README shows the
table the code gives today, and every Horovod name has its hvdllm equivalent."""
from __future__ import annotations

import importlib.util

import pytest

from hvdllm.core.horovod_support import BACKENDS, LIMITS, MODULES, backends_of
from tests import support_table as st


def _horovod_importable() -> bool:
    if importlib.util.find_spec("horovod") is None:
        return False
    try:
        for module in MODULES:
            importlib.import_module(module)
    except Exception:   # noqa: BLE001 - Horovod built without a framework: nothing to compare
        return False
    return True


def test_readme_table_is_generated_from_the_code() -> None:
    text = st.README.read_text()
    assert st.START in text and st.END in text, f"README.md lacks {st.START} ... {st.END}"
    want = st.readme_with(st.render(st.stored_names()), text)
    assert text == want, f"README.md's Horovod API table is out of date; regenerate it: {st.REGENERATE}"


def test_name_list_matches_the_installed_horovod() -> None:
    if not _horovod_importable():
        pytest.skip("Horovod (with torch and TensorFlow) is not importable here")
    import horovod

    stored = st.stored_names()
    assert horovod.__version__ == "0.28.1"
    assert st.horovod_names() == stored, "tests/data/horovod_names.json differs from the installed Horovod; " \
                                         "regenerate: python -m tests.support_table --names --write"
    assert set(stored) == set(MODULES) and all(len(v) > 30 for v in stored.values())


def test_every_horovod_name_has_an_hvdllm_equivalent() -> None:
    missing = [f"{MODULES[m]}.{n}" for m, n, _, present, _ in st.rows(st.stored_names()) if not present]
    assert not missing, f"{len(missing)} Horovod names have no hvdllm equivalent: {missing}"


def test_backend_limits_name_real_horovod_names() -> None:
    every = {n.rsplit(".", 1)[-1] for names in st.stored_names().values() for n in names}
    assert set(LIMITS) <= every
    for name, (backends, why) in LIMITS.items():
        assert set(backends) < set(BACKENDS) and why, name
    assert backends_of("allreduce") == BACKENDS and backends_of("Adasum") == ("horovod",)


def test_the_table_marks_missing_names_and_limits() -> None:
    """The renderer itself: a name hvdllm lacks is shown missing and lowers the coverage figure."""
    names = {"horovod.keras": ["allreduce", "Adasum", "no_such_name"]}
    text = st.render(names)
    assert "| `no_such_name` | **missing** |" in text and "Coverage: 2 of 3 names (66.7%)" in text
    assert "| `Adasum` | `hvdllm.keras.Adasum` | yes | no | no |" in text


# Horovod's signature is (*args, **kwargs) or a C-extension detail for these; hvdllm's takes the documented
# arguments (ProcessSet: ranks; init: process_sets; comm= is not supported yet).
SIGNATURE_EXCEPTIONS = {"init", "ProcessSet", "gpu_available", "is_version_greater_equal_than",
                        "callbacks.is_version_greater_equal_than", "split_list"}


def test_tensorflow_and_keras_signatures_start_with_horovods() -> None:
    """For every callable of horovod.tensorflow, horovod.tensorflow.keras and horovod.keras (and their
    callbacks/elastic), Horovod's parameter names, in order, begin hvdllm's (hvdllm may add keywords)."""
    if not _horovod_importable():
        pytest.skip("Horovod (with torch and TensorFlow) is not importable here")
    import inspect

    def params(obj: object) -> list[str] | None:
        try:
            return list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return None

    bad = []
    for module, names in st.stored_names().items():
        if module == "horovod.torch":
            continue
        for name in names:
            if name in SIGNATURE_EXCEPTIONS or name in ("callbacks", "elastic"):
                continue
            theirs, ours = importlib.import_module(module), importlib.import_module(MODULES[module])
            if not st.resolve(module, name):
                continue   # a missing name fails test_every_horovod_name_has_an_hvdllm_equivalent
            for part in name.split("."):
                theirs, ours = getattr(theirs, part), getattr(ours, part)
            want, got = params(theirs), params(ours)
            if callable(theirs) and want is not None and (got is None or got[:len(want)] != want):
                bad.append(f"{MODULES[module]}.{name}: Horovod {want}, hvdllm {got}")
    assert not bad, "\n".join(bad)
