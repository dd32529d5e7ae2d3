"""Atomic checkpoints: a directory per step, written aside and renamed into place.

Layout of ``<run>/checkpoints/step_00000100/``:
    model.safetensors      weights (numpy arrays; names are the framework's parameter names)
    optimizer.safetensors  optimizer tensors (flattened names, see the trainer)
    rng.safetensors        RNG states (per rank where they differ)
    tokenizer.json         how to decode samples
    meta.json              step, data position, config, model shape, framework, optimizer scalars, and
                           ``files``: the sha256 and size of every other file; written last

Atomicity: everything is written into ``.tmp-step_...`` next to the final name, each file fsync'ed,
then the directory is renamed (``os.replace`` for a leftover older directory of the same step) and the
parent fsync'ed. A reader only ever sees complete checkpoints: a directory counts only when its name
is ``step_<N>`` and it holds ``meta.json``. A process killed mid-write leaves a ``.tmp-*`` folder that
the next writer removes, and the previous checkpoint untouched.

Verification: :func:`verify` (and :func:`read_checkpoint`, which hashes the bytes it loads) checks every
file against ``meta.json``; a checkpoint that does not verify raises :class:`CorruptCheckpoint` naming the
file. :func:`newest_verified` is what ``--resume`` uses: the newest checkpoint that verifies, warning once
per newer one skipped (so keep ``run.keep_checkpoints`` >= 2 to have one to fall back to).

Framework-free: arrays are numpy; the trainers convert.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hvdllm.train.config import ConfigError

CHECKPOINTS = "checkpoints"
META = "meta.json"
_NAME = re.compile(r"^step_(\d{8,})$")
# Test hook: seconds to sleep after each file of a checkpoint (lets a test kill a writer mid-save).
_DELAY_ENV = "HVDLLM_CHECKPOINT_WRITE_DELAY"


class CorruptCheckpoint(ConfigError):
    """A checkpoint whose files do not match the sizes and sha256 sums its ``meta.json`` records."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pause() -> None:
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def arrays_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``arrays`` (contiguous copies; bool/0-d arrays are fine)."""
    from safetensors.numpy import save

    # (np.ascontiguousarray would turn 0-d arrays into 1-d ones)
    tensors = {k: np.asarray(v) if np.asarray(v).flags.c_contiguous else np.asarray(v).copy(order="C")
               for k, v in arrays.items()}
    return save(tensors, metadata=dict(metadata) if metadata else None)


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file and fsync it."""
    _write_bytes(path, arrays_bytes(arrays, metadata))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint(run_dir: str | Path, step: int, files: Mapping[str, Mapping[str, np.ndarray]],
                     meta: Mapping[str, Any], extra_files: Mapping[str, bytes] | None = None,
                     keep: int | None = None) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` atomically and return its path.

    ``files`` maps a file stem to its arrays (``{"model": {...}, "optimizer": {...}}`` ->
    ``model.safetensors`` ...); ``extra_files`` are raw bytes (e.g. ``tokenizer.json``); ``meta`` is
    JSON-able and written last, with the sha256 and size of every other file under ``"files"``. With
    ``keep``, older checkpoints beyond the newest ``keep`` are removed.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):          # a writer killed earlier
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    blobs = {f"{stem}.safetensors": arrays_bytes(arrays) for stem, arrays in files.items()}
    sums = {}
    for name, data in {**blobs, **(extra_files or {})}.items():
        _write_bytes(tmp / name, data)
        sums[name] = _digest(data)
        _pause()
    _write_bytes(tmp / META, json.dumps({**meta, "step": step, "files": sums}, indent=1, sort_keys=True).encode())
    _pause()
    _fsync_dir(tmp)
    if final.exists():                          # same step written again: swap, then drop the old one
        old = root / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep:
        prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` (or a ``checkpoints`` folder), oldest first."""
    root = Path(run_dir)
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and (d / META).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself when it is a checkpoint directory, else the newest checkpoint under it."""
    p = Path(path)
    if (p / META).is_file():
        return p
    return latest_checkpoint(p)


def prune(run_dir: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints."""
    for _, d in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (CorruptCheckpoint when it is not a JSON object with a file list)."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint file {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not meta["files"]:
        raise CorruptCheckpoint(f"checkpoint file {path} records no file checksums")
    return meta


def _checked_bytes(ckpt: Path, name: str, meta: Mapping[str, Any]) -> bytes:
    """The bytes of ``ckpt/name`` when they match the size and sha256 in ``meta``; else CorruptCheckpoint."""
    path = ckpt / name
    want = meta["files"].get(name)
    if not isinstance(want, dict) or "sha256" not in want or "bytes" not in want:
        raise CorruptCheckpoint(f"checkpoint file {ckpt / META} records no checksum for {name}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"checkpoint file {path} is unreadable ({e.strerror or type(e).__name__})") from None
    if len(data) != want["bytes"]:
        raise CorruptCheckpoint(f"checkpoint file {path} has {len(data)} bytes, meta.json records {want['bytes']}")
    got = hashlib.sha256(data).hexdigest()
    if got != want["sha256"]:
        raise CorruptCheckpoint(f"checkpoint file {path} has sha256 {got[:16]}..., meta.json records "
                                f"{str(want['sha256'])[:16]}...")
    return data


def verify(ckpt: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its ``meta.json``; returns the meta, else CorruptCheckpoint."""
    p = Path(ckpt)
    meta = read_meta(p)
    for name in sorted(meta["files"]):
        _checked_bytes(p, name, meta)
    return meta


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """All safetensors files of a checkpoint (by stem) and its metadata, each file verified as it is read."""
    from safetensors.numpy import load

    p = Path(ckpt)
    meta = read_meta(p)
    files = {}
    for name in sorted(n for n in meta["files"] if n.endswith(".safetensors")):
        data = _checked_bytes(p, name, meta)
        try:
            files[name[: -len(".safetensors")]] = load(data)
        except Exception as e:  # noqa: BLE001 - a checksummed file safetensors cannot parse is still corrupt
            raise CorruptCheckpoint(f"checkpoint file {p / name} does not parse ({' '.join(str(e).split())})") from None
    return files, meta


def newest_verified(run_dir: str | Path, warn: Callable[[str], None]) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint in ``run_dir`` that verifies (or None) and the newer ones that did not;
    ``warn`` gets one line per skipped checkpoint, naming the bad file."""
    bad = []
    for _, d in reversed(list_checkpoints(run_dir)):
        try:
            verify(d)
        except CorruptCheckpoint as e:
            warn(f"{e}; skipping it")
            bad.append(d)
            continue
        return d, bad
    return None, bad


# -- nested state <-> flat arrays + JSON (for optimizer state dicts) -----------------------------------
def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Split a nested structure of dicts/lists/scalars/arrays into flat arrays and a JSON skeleton.

    Arrays (numpy, or anything with ``__array__``) go to the returned dict under dotted names and are
    replaced by ``{"__array__": name}`` in the skeleton; everything else stays in the skeleton.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(x: Any, name: str) -> Any:
        if isinstance(x, dict):
            return {"__dict__": [[_key(k), walk(v, f"{name}.{k}" if name else str(k))] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"__list__": [walk(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(x)],
                    "__tuple__": isinstance(x, tuple)}
        if isinstance(x, (bool, int, float, str)) or x is None:
            return x
        a = np.asarray(x)
        arrays[name] = a
        return {"__array__": name}

    return arrays, walk(tree, prefix)


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TypeError(f"state keys must be int or str, got {type(k).__name__}")


def unflatten_state(arrays: Mapping[str, np.ndarray], skeleton: Any, to_tensor: Any = None) -> Any:
    """Inverse of :func:`flatten_state`; ``to_tensor`` converts each numpy array (e.g. ``torch.from_numpy``)."""
    conv = to_tensor or (lambda a: a)

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__array__" in x:
                return conv(arrays[x["__array__"]])
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            if "__list__" in x:
                items = [walk(v) for v in x["__list__"]]
                return tuple(items) if x.get("__tuple__") else items
        return x

    return walk(skeleton)
