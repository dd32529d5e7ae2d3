"""examples/keras_pipeline.py's main with --verify (the first step's loss and gradients equal the unsplit
model's, else it exits non-zero), once per schedule in one launch; reports the final losses."""
from __future__ import annotations

import os
import sys

from common import ROOT, leave_together

sys.path.insert(0, os.path.join(ROOT, "examples"))

from keras_pipeline import main  # noqa: E402

import hvdllm.tensorflow as hvd  # noqa: E402

losses = {s: main(["--verify", "--steps", "4", "--schedule", s, *sys.argv[1:]]) for s in ("1f1b", "gpipe")}
leave_together(hvd, hvd.rank(), {"losses": losses, "rank": hvd.rank()})
