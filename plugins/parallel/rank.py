"""One DDP rank that is not rank 0: ``python -m llmos.plugins.parallel.rank``.

Started by a driver host (the ranks next to rank 0) or by ``llmos kernel join`` (ranks on
another machine), always with the torchrun environment: ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``. It meets rank 0, receives the job's spec, builds
the same model, follows rank 0's steps until told to stop, and exits 0; a failed collective
(rank 0 gone, another rank dead) exits 1. It also exits when the process that started it
dies, so no rank outlives its job.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("llmos.rank")


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(levelname)s %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from .ddp import DistributedSession, join_group, leave_group, share_spec
    from .launch import DdpSpec

    rank = int(os.environ["RANK"])
    ddp = DdpSpec(int(os.environ["WORLD_SIZE"]), 0, os.environ["MASTER_ADDR"],
                  int(os.environ["MASTER_PORT"]))
    try:
        join_group(ddp, rank)
        spec = share_spec(None)
        threads = int(os.environ.get("OMP_NUM_THREADS", "1")) + 1  # a session uses threads - 1
        DistributedSession(spec, threads, ddp, rank).follow()
    except RuntimeError as exc:
        log.error("rank %d stopped: %s", rank, str(exc).splitlines()[0] if str(exc) else exc)
        return 1
    finally:
        leave_group()
    log.info("rank %d done", rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
