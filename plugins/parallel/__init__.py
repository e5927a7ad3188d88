"""Built-in parallelism: the default plan, the pipeline-stage driver and the DDP session
(registered like a third party's).

* ``llmos_plan_parallelism`` (``trylast``: any plugin may override it) turns a request's
  own arguments into a :class:`~llmos.kernel.parallel.Plan` and checks them against the
  devices: ``load --replicas N`` / ``--stages N``; ``train --parallel ddp --world-size N``
  with at most one local rank per CPU core (gloo, one thread each, as torchrun sets it);
* driver ``pipeline`` (:mod:`llmos.plugins.parallel.stage`) serves a slice of a model's
  layers; the kernel starts its hosts on demand for ``load --stages N``;
* session ``ddp`` (:mod:`llmos.plugins.parallel.ddp`): the torch host that runs a DDP
  ``train`` job runs it as rank 0 of the ranks it starts.

The kernel imports this module when it builds its plugin manager: no torch here (DDP and
the stage driver import it inside the driver host and the rank processes).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from llmos.contract.hookspecs import hookimpl
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.parallel import PIPELINE_DRIVER, Plan
from llmos.kernel.registries import DriverRegistry, DriverSpec, SessionRegistry, SessionSpec


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for the DDP rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def local_rank_limit(devices: list[dict[str, Any]]) -> int:
    """Most DDP ranks this machine runs: one per CPU core (training runs on CPU)."""
    trainers = [d for d in devices if d["driver"] == "torch" and d["state"] != "FAILED"]
    return (os.cpu_count() or 1) if trainers else 0


def _train_plan(args: dict[str, Any], devices: list[dict[str, Any]]) -> Plan:
    world = args.get("world_size") or 1
    if args.get("parallel", "none") == "none":
        if world > 1:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"train: world_size {world} needs parallel=ddp (--parallel ddp)")
        return Plan()
    local = args.get("local_ranks") or world
    if local > world:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"train: local_ranks {local} is more than world_size {world}")
    limit = local_rank_limit(devices)
    if local > limit:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"train: {local} local DDP ranks asked, this machine allows {limit} "
                          "(one per CPU core); give --local-ranks and join the others from "
                          "other machines (llmos kernel join)")
    addr = args.get("master_addr") or "127.0.0.1"
    return Plan(world_size=world, local_ranks=local, master_addr=addr,
                master_port=args.get("master_port") or free_port())


@hookimpl(trylast=True)
def llmos_plan_parallelism(syscall: str, args: dict[str, Any],
                           devices: list[dict[str, Any]]) -> Plan | None:
    if syscall == "load":
        return Plan(replicas=args.get("replicas") or 1, stages=args.get("stages") or 1)
    if syscall == "train":
        return _train_plan(args, devices)
    return None


@hookimpl
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    drivers.add(DriverSpec(
        name=PIPELINE_DRIVER, qualname="llmos.plugins.parallel.stage:StageDriver",
        probe=lambda: [],  # never started at boot: `load --stages N` starts its hosts
        description="PyTorch, one slice of a model's layers (pipeline stages, load --stages N)",
        unavailable_reason=lambda: "started on demand by load --stages N"))


@hookimpl
def llmos_register_sessions(sessions: SessionRegistry) -> None:
    sessions.add(SessionSpec("ddp", "llmos.plugins.parallel.ddp:DistributedSession",
                             "a data-parallel train job: rank 0 of its DDP ranks"))
