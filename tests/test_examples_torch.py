"""A Horovod-style torch script (tests/examples/torch_mnist_like.py) runs unchanged under horovod.torch
and, with only its import replaced, under hvdllm.torch: both at 2 ranks end with the same test loss,
accuracy and weights."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.multirank import ROOT, base_env, command

SCRIPT = ROOT / "tests" / "examples" / "torch_mnist_like.py"
HOROVOD_IMPORT = "import horovod.torch as hvd\n"


def run(script: Path, out: Path, launcher: str = "gloo", np_: int = 2) -> dict:
    cmd, extra = command(launcher, np_, [str(script), "--epochs", "2", "--out", str(out)])
    proc = subprocess.run(cmd, env=base_env(extra), capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(700)
def test_same_script_same_result_under_horovod_and_hvdllm(tmp_path: Path) -> None:
    source = SCRIPT.read_text()
    assert source.count(HOROVOD_IMPORT) == 1
    ported = tmp_path / "torch_mnist_like_hvdllm.py"
    ported.write_text(source.replace(HOROVOD_IMPORT, "import hvdllm.torch as hvd\n"))
    theirs = run(SCRIPT, tmp_path / "horovod.json")
    ours = run(ported, tmp_path / "hvdllm.json")
    assert theirs["size"] == ours["size"] == 2
    (loss_h, acc_h), (loss_o, acc_o) = theirs["history"][-1], ours["history"][-1]
    assert abs(loss_h - loss_o) <= 1e-5 * max(1.0, abs(loss_h)) and abs(acc_h - acc_o) < 1e-6
    assert theirs["history"][0][0] > theirs["history"][-1][0]          # it learned something
    assert theirs["weights"].keys() == ours["weights"].keys()
    for name in theirs["weights"]:
        np.testing.assert_allclose(ours["weights"][name], theirs["weights"][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # and the hvdllm version on the mpi4py backend (no Horovod) trains the same model
    mpi = run(ported, tmp_path / "hvdllm_mpi.json", launcher="mpirun")
    for name in theirs["weights"]:
        np.testing.assert_allclose(mpi["weights"][name], theirs["weights"][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
