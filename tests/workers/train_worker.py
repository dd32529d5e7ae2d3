"""Run `hvdllm train ARGS...` on this rank (as `horovodrun ... hvdllm train` would) and report the exit status."""
from __future__ import annotations

import os
import sys

from common import report

from hvdllm.cli import main

code = main(sys.argv[1:])
import hvdllm.torch as hvd  # noqa: E402

report(hvd.rank() if hvd.is_initialized() else 0,
       {"code": code, "rank": hvd.rank(), "size": hvd.size(), "backend": hvd.backend(),
        "cores": sorted(os.sched_getaffinity(0))})
sys.exit(code)
