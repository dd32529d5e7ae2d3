"""hvdllm.torch's module-level Horovod API: the one Frontend (core.frontend) over this adapter's backends.

The package ``__init__`` re-exports these names, and submodules import them from here (never the
package itself, which imports them: no cycle).
"""
from __future__ import annotations

import torch

from hvdllm.core.frontend import Frontend
from hvdllm.torch import backends

_front = Frontend("torch", backends.create, is_tensor=torch.is_tensor)

init, is_initialized, shutdown, collectives = _front.init, _front.is_initialized, _front.shutdown, _front.collectives
rank, size, local_rank, local_size = _front.rank, _front.size, _front.local_rank, _front.local_size
backend, threads_per_rank, add_process_set = _front.backend, _front.threads_per_rank, _front.add_process_set
allreduce, allreduce_async_, grouped_allreduce = _front.allreduce, _front.allreduce_async_, _front.grouped_allreduce
broadcast, allgather, broadcast_object = _front.broadcast, _front.allgather, _front.broadcast_object
barrier, reinit = _front.barrier, _front.reinit
