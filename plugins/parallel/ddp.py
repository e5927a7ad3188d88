"""Data-parallel training: a train job as N ranks of torch DistributedDataParallel.

Launched the torchrun way: the PyTorch driver host that runs the job is **rank 0** (the
job's ``train`` tasks name :class:`DistributedSession`, registered as session ``ddp``); it
starts the other local ranks as subprocesses (``python -m llmos.plugins.parallel.rank``)
with ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``OMP_NUM_THREADS=1`` in their environment, and every rank joins the group with
``init_method="env://"`` (gloo: training in llmos runs on CPU). Ranks on other machines
join the same rendezvous with ``llmos kernel join``.

Contract (the same as single-process training, :class:`~llmos.drivers.training.TrainingSession`):

* the job is still time-sliced in quanta: rank 0 drives, sending a command before each
  step (``broadcast``), and the other ranks follow; between quanta they wait;
* step ``s`` uses the same global batch as one process would (same seed, same order);
  rank ``r`` takes rows ``r, r + N, r + 2N, ...`` of it (DistributedSampler-style), padded
  to the global batch's longest row, and its loss is weighted so that DDP's gradient
  average equals the global batch's mean gradient, whatever the shard sizes;
* dropout is keyed (:mod:`llmos.drivers.dropout`): each row draws the masks one process
  draws for it, so the averaged gradient equals one process's up to float summation order;
* after every step the ranks compare a fingerprint of their parameters (per-tensor sum
  and sum of squares, float64): any difference fails the job;
* only rank 0 checkpoints (the base class's checkpoint); a job resumed from it, with any
  number of ranks, continues at the same step;
* a rank that dies fails the job at once with the reason; the remaining local ranks are
  stopped and the rendezvous port is released.

The job's spec travels to the other ranks as JSON bytes in a uint8 tensor (never pickle).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.dropout import DropoutKey, keyed_dropout
from llmos.drivers.training import TrainingSession, TrainSpec

from .launch import DdpSpec, rank_environment, start_ranks

#: How long a collective (and the rendezvous) may wait: between two quanta the other
#: ranks wait for rank 0's next command, while the host serves other work.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: Commands rank 0 broadcasts before each step.
STOP, STEP = 0, 1


def join_group(ddp: DdpSpec, rank: int) -> None:
    """``init_process_group`` over env:// (the variables of :func:`rank_environment`; the
    thread count stays the process's own)."""
    env = rank_environment(ddp, rank, int(os.environ.get("LOCAL_RANK", 0)))
    os.environ.update({k: v for k, v in env.items() if k != "OMP_NUM_THREADS"})
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=ddp.world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def share_spec(spec: TrainSpec | None) -> TrainSpec:
    """Rank 0 sends its spec (JSON in a uint8 tensor); every rank returns it."""
    raw = json.dumps(asdict(spec)).encode() if spec is not None else b""
    size = torch.tensor([len(raw)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
        torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return TrainSpec(**json.loads(bytes(data.tolist()).decode()))


class DistributedSession(TrainingSession):
    """One rank of a DDP training job (see the module's contract)."""

    def __init__(self, spec: TrainSpec, threads: int, ddp: DdpSpec, rank: int,
                 procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        self.ddp, self.rank = ddp, rank
        self.procs = procs or []
        self.sync_checks = 0
        if rank != 0:  # only rank 0 checkpoints: the others never restore or write one
            spec = TrainSpec(**{**asdict(spec), "checkpoint": f"{spec.checkpoint}.rank{rank}"})
        super().__init__(spec, threads)
        self._share_optimizer_state()
        self.wrapped = DistributedDataParallel(self.model)

    @classmethod
    def start(cls, spec: dict[str, Any], threads: int) -> DistributedSession:
        """Rank 0 in the driver host (the session of a ``train`` task whose ``spec`` has
        ``ddp``: the plan): start the local ranks, meet them all, share the spec."""
        if dist.is_initialized():
            raise KernelError(ErrorCode.BUSY, "this driver host already runs a DDP job; "
                              "retry when it ends")
        plan = DdpSpec(**spec["ddp"])
        train = TrainSpec(**{k: v for k, v in spec.items() if k != "ddp"})
        procs = start_ranks(plan, range(1, plan.local_ranks))
        try:
            join_group(plan, 0)
            share_spec(train)
            return cls(train, threads, plan, 0, procs)
        except BaseException as exc:
            leave_group()
            _stop(procs)
            if isinstance(exc, KernelError):
                raise
            raise KernelError(ErrorCode.DEVICE_FAILED, f"the DDP ranks did not meet: {exc}") from exc

    # --- the step -------------------------------------------------------------------

    def _train_step(self, step: int) -> tuple[float, int]:
        try:
            if self.rank == 0:
                dist.broadcast(torch.tensor([STEP, step], dtype=torch.int64), src=0)
            return self._shard_step(step)
        except RuntimeError as exc:  # a collective failed: a rank died or hung up
            raise self._failure(exc) from exc

    def _shard_step(self, step: int) -> tuple[float, int]:
        texts, labels = self._batch(step)
        total, world = len(texts), self.ddp.world_size
        mine = list(range(self.rank, total, world))
        # the loss over the global batch as one process computes it: a mean, weighted by
        # class when the classes are uneven (TrainingSession.class_weights)
        norm = float(self.class_weights[labels].sum()) if self.class_weights is not None else total
        weight = world / norm if mine else 0.0
        rows = mine or [0]  # an empty shard still joins the gradient all-reduce, weighted 0
        # the global batch's rows, padded to its longest: each row as one process sees it
        shard = {name: tensor[rows] for name, tensor in self._encode(texts).items()}
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        with keyed_dropout(self.model, DropoutKey(seed=self.spec.seed, step=step, rows=rows)):
            logits = self.wrapped(**shard).logits
        summed = torch.nn.functional.cross_entropy(logits, labels[rows], weight=self.class_weights,
                                                   reduction="sum")
        (summed * weight).backward()  # DDP averages over ranks: the global batch's mean
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.tensor([float(summed.detach()) if mine else 0.0], dtype=torch.float64)
        dist.all_reduce(loss)
        self._check_in_sync()
        return float(loss.item()) / total, total

    def _check_in_sync(self) -> None:
        """Every rank's parameters must be identical after a step (compared exactly)."""
        params = [p.detach().double() for p in self.model.parameters()]
        mine = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
        everyone = [torch.empty_like(mine) for _ in range(self.ddp.world_size)]
        dist.all_gather(everyone, mine)
        differ = [r for r, theirs in enumerate(everyone) if not torch.equal(theirs, everyone[0])]
        if differ:
            raise KernelError(ErrorCode.INTERNAL, f"DDP ranks {differ} diverged from rank 0 at "
                              f"step {self.step}")
        self.sync_checks += 1

    def _share_optimizer_state(self) -> None:
        """Rank 0's step, loss and AdamW moments (restored from a checkpoint) to every rank."""
        head = torch.tensor([self.step, int(bool(self.optimizer.state)),
                             0 if math.isnan(self.loss) else 1], dtype=torch.int64)
        loss = torch.tensor([0.0 if math.isnan(self.loss) else self.loss], dtype=torch.float64)
        dist.broadcast(head, src=0)
        dist.broadcast(loss, src=0)
        self.step = int(head[0])
        self.loss = float(loss.item()) if head[2] else float("nan")
        if not head[1]:
            return
        for param in self.model.parameters():
            state = self.optimizer.state[param]
            if not state:  # AdamW's state layout, filled by rank 0's values below
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                             exp_avg_sq=torch.zeros_like(param))
            for key in sorted(state):
                dist.broadcast(state[key], src=0)

    # --- driving (rank 0) and following (the others) -----------------------------------

    def run(self, seconds: float) -> dict[str, Any]:
        """Rank 0: one quantum, as in one process, plus what the ranks are doing."""
        progress = super().run(seconds)
        progress.update(world_size=self.ddp.world_size, sync_checks=self.sync_checks,
                        rendezvous=f"{self.ddp.master_addr}:{self.ddp.master_port}",
                        rank_pids=[p.pid for p in self.procs])
        return progress

    def follow(self) -> None:
        """Ranks other than 0: run the steps rank 0 commands until it says stop."""
        self.model.train()  # from_pretrained returns it in eval mode: dropout off
        command = torch.zeros(2, dtype=torch.int64)
        while True:
            dist.broadcast(command, src=0)
            if int(command[0]) == STOP:
                return
            self.step = int(command[1])
            self._shard_step(self.step)

    def finish(self) -> dict[str, Any]:
        self.close()  # the other ranks are done: evaluation and saving happen on rank 0
        return super().finish()

    def close(self) -> None:
        """Rank 0: tell the other ranks to stop, wait for the local ones, leave the group."""
        if self.rank == 0 and dist.is_initialized():
            try:
                dist.broadcast(torch.tensor([STOP, self.step], dtype=torch.int64), src=0)
            except RuntimeError:
                pass  # a rank is already gone: _stop ends the rest
        _stop(self.procs)
        leave_group()

    def _failure(self, exc: RuntimeError) -> KernelError:
        """Stop everything after a failed collective; the error names the rank that died."""
        dead = [f"rank {i + 1} (pid {p.pid}) exited with status {p.poll()}"
                for i, p in enumerate(self.procs) if p.poll() is not None]
        leave_group()  # first: the other ranks' collectives with rank 0 fail and they exit
        _stop(self.procs)
        reason = "; ".join(dead) or f"a rank stopped answering ({str(exc).splitlines()[0]})"
        return KernelError(ErrorCode.DEVICE_FAILED,
                           f"DDP job stopped: {reason}; resume it from its last checkpoint "
                           f"with train --resume JOB")


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """Wait briefly for each local rank to exit, then kill it."""
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def leave_group() -> None:
    """Leave the process group (closes rank 0's rendezvous store and its port)."""
    if dist.is_initialized():
        dist.destroy_process_group()
