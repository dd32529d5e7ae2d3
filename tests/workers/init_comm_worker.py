"""hvd.init(comm=...) with Horovod's signature: the world communicator or all ranks work; a subset is a
one-line ValueError that leaves hvdllm uninitialised (then a plain init works)."""
from __future__ import annotations


from common import leave_together

import torch
from mpi4py import MPI

import hvdllm.torch as hvd

torch.set_num_threads(1)
world = MPI.COMM_WORLD
errors = []
try:
    hvd.init(comm=[0])                                   # a subset of the launched ranks
except ValueError as e:
    errors.append(str(e))
uninitialised = not hvd.is_initialized()
sub = world.Split(0 if world.Get_rank() == 0 else 1, world.Get_rank())
try:
    hvd.init(comm=sub)
except ValueError as e:
    errors.append(str(e))
hvd.init(comm=world)                                     # Horovod's usual mpi4py form
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
hvd.shutdown()
hvd.init(comm=list(range(world.Get_size())))            # all ranks, in any order
leave_together(hvd, hvd.rank(), {"errors": errors, "uninitialised": uninitialised, "total": total,
                                 "rank": hvd.rank(), "size": hvd.size(), "backend": hvd.backend()})
