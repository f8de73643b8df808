"""Push a gradient, pull parameters: two-sided Send/Recv against one-sided RMA (Put + Get, passive target).

    mpirun -np 2 python tools/ps_transport.py [n_floats] [rounds]

Rank 0 plays the parameter server, rank 1 a worker. Two-sided: the worker Sends n floats and
Recvs n floats, the server Recvs and Sends (what ``mpilm/modes/async_ps.py`` does). One-sided: the
worker Puts n floats into the server's window and Gets n floats from it under a passive-target
lock, with no notification at all (a real server would also need a flag it polls, which only adds
cost), while the server sits in MPI (a Barrier) so its progress engine runs. Prints the median
round trip of each and their ratio. Why it matters: ``--sync async`` uses the faster one.
"""

import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
grad, params = np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
window_memory = np.zeros(2 * n, dtype=np.float32) if comm.rank == 0 else None
win = MPI.Win.Create(window_memory if comm.rank == 0 else None, disp_unit=4, comm=comm)

two_sided, one_sided = [], []
for _ in range(rounds + 1):
    comm.Barrier()
    t0 = time.perf_counter()
    if comm.rank == 1:
        comm.Send(grad, dest=0, tag=1)
        comm.Recv(params, source=0, tag=2)
    elif comm.rank == 0:
        comm.Recv(grad, source=1, tag=1)
        comm.Send(params, dest=1, tag=2)
    two_sided.append(time.perf_counter() - t0)
    comm.Barrier()
    t0 = time.perf_counter()
    if comm.rank == 1:
        win.Lock(0, MPI.LOCK_EXCLUSIVE)
        win.Put(grad, 0, target=(0, n, MPI.FLOAT))
        win.Unlock(0)  # the gradient is in the server's memory
        win.Lock(0, MPI.LOCK_SHARED)
        win.Get(params, 0, target=(n, n, MPI.FLOAT))
        win.Unlock(0)
        one_sided.append(time.perf_counter() - t0)
    comm.Barrier()  # the server waits here, in MPI: passive-target progress
if comm.rank == 1:
    a, b = statistics.median(two_sided[1:]), statistics.median(one_sided[1:])
    print(f"{n * 4 / 2**20:.1f} MiB each way, {rounds} rounds: Send/Recv {a * 1e3:.1f} ms, Put/Get {b * 1e3:.1f} ms "
          f"(one-sided / two-sided = {b / a:.2f})", flush=True)
win.Free()
