"""Starting DDP ranks the torchrun way (no torch import: the CLI uses it too).

Each rank is a process ``python -m llmos.plugins.parallel.rank`` whose environment names
the rendezvous: ``MASTER_ADDR``, ``MASTER_PORT`` (rank 0's TCP store), ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, and ``OMP_NUM_THREADS=1`` (one thread per rank, as torchrun
sets it). Rank 0 is the driver host that runs the job; the ranks next to it are started
by that host, the ranks of other machines by ``llmos kernel join`` (:func:`join`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DdpSpec:
    """Where the ranks meet and how many there are (from the kernel's plan)."""

    world_size: int
    #: Ranks on the machine of rank 0, rank 0 included.
    local_ranks: int
    master_addr: str
    master_port: int


def rank_environment(ddp: DdpSpec, rank: int, local_rank: int) -> dict[str, str]:
    """The torchrun environment of one rank."""
    return {"MASTER_ADDR": ddp.master_addr, "MASTER_PORT": str(ddp.master_port),
            "RANK": str(rank), "WORLD_SIZE": str(ddp.world_size), "LOCAL_RANK": str(local_rank),
            "OMP_NUM_THREADS": "1"}


def start_ranks(ddp: DdpSpec, ranks: range) -> list[subprocess.Popen[bytes]]:
    """Start ``ranks`` on this machine; local ranks count from 1 next to rank 0 (which is
    local rank 0), from 0 on a joining machine."""
    first_local = 1 if ranks.start == 1 else 0
    return [subprocess.Popen([sys.executable, "-m", "llmos.plugins.parallel.rank"],
                             env={**os.environ, **rank_environment(ddp, rank, first_local + i)},
                             stdin=subprocess.DEVNULL)
            for i, rank in enumerate(ranks)]


def join(address: str, world_size: int, first_rank: int, count: int) -> int:
    """``llmos kernel join``: run ranks ``first_rank .. first_rank + count - 1`` of the job
    whose rendezvous is ``address`` (``HOST:PORT``) until they end; their worst status.

    The model and data paths of the job must exist on this machine too (the ranks receive
    the job's spec from rank 0 and read the same files).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"rendezvous address must be HOST:PORT, got {address!r}")
    if not 1 <= first_rank or first_rank + count > world_size or count < 1:
        raise ValueError(f"ranks {first_rank}..{first_rank + count - 1} do not fit a world of "
                         f"{world_size} (rank 0 is the kernel's)")
    ddp = DdpSpec(world_size, 0, host, int(port))
    procs = start_ranks(ddp, range(first_rank, first_rank + count))
    try:
        return max(proc.wait() for proc in procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        return 130
