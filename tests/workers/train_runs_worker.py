"""Several `hvdllm train` invocations in one launch (saves the launcher's start-up per run): argv[1] is a
JSON list of argument lists (all of one --framework). Reports each run's exit status and the last line it
wrote to stderr."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys

from common import report

from hvdllm.cli import main

codes, errors = [], []
runs = json.loads(sys.argv[1])
for argv in runs:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes.append(main(argv))
    sys.stderr.write(err.getvalue())
    lines = err.getvalue().strip().splitlines()
    errors.append(lines[-1] if lines else "")
hvd = importlib.import_module("hvdllm.tensorflow" if "tensorflow" in runs[0] else "hvdllm.torch")

report(hvd.rank(), {"codes": codes, "errors": errors, "rank": hvd.rank(), "size": hvd.size()})
sys.exit(0)
