"""Model syscalls: import, export, load, unload, models; placement and memory budgets.

A mixin of :class:`~llmos.kernel.core.KernelCore` (it shares the core's state and runs on
its thread). ``load`` and ``unload`` may touch several driver hosts: such a job visits its
``targets`` one after another (RUNNING on one host, back to QUEUED for the next) and ends
when the last is done. Registry imports and exports run on the kernel pseudo-device; an
export runs in a subprocess (``python -m llmos.drivers.export``) so the kernel process
never imports a framework.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from . import datasets
from .compression import serving_hosts
from .devices import DeviceHost, HostState, hardware_of
from .generation import GENERATE_BATCHING
from .jobs import Job, JobState
from .mixin import CoreServices
from .placement import TUNE_SHAPES, CostModel, batch_shape, is_generative, machine_id, memory_need
from .registry import ModelVersion, check_name

if TYPE_CHECKING:
    from .core import Request
    from .scheduler import BatchingConfig

log = logging.getLogger(__name__)

#: Share of a hardware's memory that loaded models may use (CPU: of RAM).
MEMORY_FRACTION = 0.8


class ModelSyscalls(CoreServices):
    """Handlers and completion logic for everything that changes where models live."""

    costs: CostModel
    batching: BatchingConfig
    memory_budget: int | None
    _executor: ThreadPoolExecutor
    _kernel_task: tuple[Future[dict[str, Any]], Job] | None
    #: Finishes a promote job once its version is loaded (in CompressionSyscalls).
    _promoted: Callable[[Job], None]
    _fail_orphans: Callable[[], None]
    _candidates: Callable[[Job], list[str]]
    # From ParallelPlacement (kernel/parallel.py).
    _plan: Callable[..., Any]
    _parallel_hosts: Callable[..., list[DeviceHost]]
    _retire_host: Callable[[DeviceHost, str], None]

    # --- import and export (kernel pseudo-device) -------------------------------------

    def _import(self, request: Request) -> Job:
        source, path = request.args["source"], request.args["path"]
        if bool(source) == bool(path):
            raise KernelError(ErrorCode.BAD_REQUEST, "import: give exactly one of source or path")
        if source:
            self.ext.sources.get(source)  # NOT_FOUND with the known names
        name = request.args["name"] or source or Path(path).name.lower()
        return self._admit(request, name=check_name(name))

    def _export(self, request: Request) -> Job:
        version = self.registry.resolve(request.args["model"], request.args["version"])
        return self._admit(request, path=str(version.path), handle=version.ref)

    def _start_kernel_task(self, job: Job) -> None:
        work = self._run_import if job.syscall == "import" else self._run_export
        self._kernel_task = (self._executor.submit(work, dict(job.args)), job)

    def _run_import(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args["source"]:
            folder = Path(args["path"]).expanduser()
            recipe = {"op": "import", "path": str(folder)}
            version, created = self.registry.import_folder(args["name"], folder, recipe)
            return {"created": created, **version.describe()}
        source = self.ext.sources.get(args["source"])
        located = source.locate()
        recipe = {"op": "import", "source": args["source"]}
        if source.convert is None:
            version, created = self.registry.import_folder(args["name"], located, recipe)
            return {"created": created, **version.describe()}
        with self.registry.scratch(args["name"]) as out:
            source.convert(located, out)
            version, created = self.registry.import_folder(args["name"], out, recipe, move=True)
        return {"created": created, **version.describe()}

    def _run_export(self, args: dict[str, Any]) -> dict[str, Any]:
        command = [sys.executable, "-m", "llmos.drivers.export", args["path"], "--to", args["format"]]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=args["timeout"] or 3600)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 2:
            raise _export_error(done.stderr)
        if done.returncode != 0 or not lines:
            raise KernelError(ErrorCode.INTERNAL, f"export exited with {done.returncode}: "
                              f"{done.stderr.strip()[-500:]}")
        return {"model": args["handle"], "format": args["format"], **json.loads(lines[-1])}

    # --- load and unload --------------------------------------------------------------

    def _hosts(self) -> dict[str, DeviceHost]:
        assert self.devices is not None
        return self.devices.hosts

    def _targets(self, device: str | None, driver: str | None,
                 generative: bool = False) -> list[DeviceHost]:
        """The hosts a load may use: one named device, one driver's, or every usable one
        (for a generative model: every one whose driver generates)."""
        hosts = self._hosts()
        if generative:
            makers = sorted({h.spec.name for h in hosts.values() if h.spec.generates})
            named = hosts[device].spec if device in hosts else (
                self.ext.drivers.get(driver) if driver is not None else None)
            if named is not None and not named.generates:
                raise KernelError(ErrorCode.BAD_REQUEST,
                                  f"driver {named.name!r} cannot run generative models "
                                  f"(drivers that can: {', '.join(makers) or 'none'})")
            if device is None and driver is None:
                hosts = {n: h for n, h in hosts.items() if h.spec.generates}
                if not hosts:
                    raise KernelError(ErrorCode.DEVICE_FAILED,
                                      "no driver here can run generative models")
        if device is not None:
            if device not in hosts:
                raise KernelError(ErrorCode.NOT_FOUND,
                                  f"unknown device {device!r} (devices: {', '.join(sorted(hosts))})")
            chosen = [hosts[device]]
        elif driver is not None:
            spec = self.ext.drivers.get(driver)  # NOT_FOUND with the known drivers
            chosen = [h for h in hosts.values() if h.spec.name == driver and not h.role]
            if not chosen:
                reason = spec.unavailable_reason() or "it was not started (see --devices)"
                raise KernelError(ErrorCode.DEVICE_FAILED,
                                  f"driver {driver!r} has no device here: {reason}")
        else:  # replica and stage hosts serve only the model they were started for
            chosen = [h for h in hosts.values() if not h.role]
        usable = [h for h in chosen if h.state is not HostState.FAILED]
        if not usable:
            errors = "; ".join(f"{h.name}: {h.last_error}" for h in chosen) or "none started"
            raise KernelError(ErrorCode.DEVICE_FAILED, f"no usable device ({errors})")
        return usable

    def _check_memory(self, version: ModelVersion, hosts: list[DeviceHost]) -> int:
        """Bytes the load needs per host; KernelError(BUSY) if a hardware would overflow."""
        need = memory_need(version.path)  # lanes (replicas) share their hardware's memory
        for hardware in {hardware_of(h.device) for h in hosts}:
            adding = need * sum(1 for h in hosts if hardware_of(h.device) == hardware)
            used = sum(p.get("memory", 0) for h in self._hosts().values()
                       if hardware_of(h.device) == hardware for p in h.wanted.values())
            budget = self._budget(hardware, hosts)
            if used + adding > budget:
                raise KernelError(
                    ErrorCode.BUSY,
                    f"loading {version.ref} needs ~{adding / 2**20:.0f} MiB on {hardware}, "
                    f"{used / 2**20:.0f} MiB of its {budget / 2**20:.0f} MiB budget are in use; "
                    "unload a model or load onto fewer drivers (--driver)")
        return need

    def _budget(self, hardware: str, hosts: list[DeviceHost]) -> int:
        if self.memory_budget is not None:
            return self.memory_budget
        if hardware == "cpu":
            return int(psutil.virtual_memory().total * MEMORY_FRACTION)
        memory = max(int(h.info.get("memory_bytes", 0)) for h in self._hosts().values()
                     if hardware_of(h.device) == hardware)
        return int(memory * MEMORY_FRACTION)

    def _load(self, request: Request) -> Job | dict[str, Any]:
        version = self.registry.resolve(request.args["model"], request.args["version"])
        generative = is_generative(version.path)
        plan = self._plan("load", request.args)
        parallel = plan.replicas > 1 or plan.stages > 1
        if parallel:
            hosts = self._parallel_hosts(version, plan, request.args["device"], request.args["driver"])
        else:
            hosts = serving_hosts(version, self._targets(request.args["device"],
                                                         request.args["driver"], generative))
        options: dict[str, Any] = {"precision": request.args["precision"]}
        if request.args["precision"] == "int8":
            options["calibration"] = self._calibration(version, request.args["calibrate"])
        if generative and request.args["max_seqs"]:
            options["max_seqs"] = request.args["max_seqs"]
        if generative and request.args["prefix_cache_mb"] is not None:
            options["prefix_cache_mb"] = request.args["prefix_cache_mb"]
        todo = [h for h in hosts if version.ref not in h.wanted
                or any(h.wanted[version.ref]["options"].get(k) != v for k, v in options.items())]
        if not todo:
            return self._placements(version.ref, hosts)
        need = self._check_memory(version, todo)
        precision = request.args["precision"]
        cached: set[str] = set()
        for host in todo:
            machine = machine_id(precision, host.threads, host.streams)
            if timings := self.registry.tuning(version, machine).get(host.name):
                self.costs.record(version.ref, host.name, timings)
                cached.add(host.name)
        tune = [] if generative or parallel else [h.name for h in todo if h.name not in cached]
        return self._admit(
            request, handle=version.ref, path=str(version.path), memory=need, options=options,
            targets=[h.name for h in todo], tune=tune, done=[h.name for h in hosts if h not in todo])

    @staticmethod
    def _calibration(version: ModelVersion, calibrate: str | None) -> dict[str, str]:
        """The texts an int8 load calibrates on: ``calibrate`` (a bundled dataset or a file),
        else the data the version was trained on; KernelError if neither."""
        if calibrate in datasets.BUNDLED:
            return {"name": calibrate}
        if calibrate:
            file = Path(calibrate).expanduser().resolve()
            if not file.is_file():
                raise KernelError(ErrorCode.NOT_FOUND, f"calibrate: {calibrate!r} is neither a "
                                  f"bundled dataset ({', '.join(datasets.BUNDLED)}) nor a file")
            return {"path": str(file)}
        if version.recipe.get("data"):
            return dict(version.recipe["data"])
        raise KernelError(ErrorCode.BAD_REQUEST, f"load: precision int8 calibrates on texts, and "
                          f"{version.ref} records no training data: pass calibrate (a bundled "
                          f"dataset such as reviews, or a CSV/JSONL path)")

    def _unload(self, request: Request) -> Job:
        version = self.registry.resolve(request.args["model"], request.args["version"])
        hosts = [h for h in self._hosts().values() if version.ref in h.wanted
                 and request.args["device"] in (None, h.name)]
        if not hosts:
            where = request.args["device"] or "any device"
            raise KernelError(ErrorCode.NOT_FOUND, f"{version.ref} is not loaded on {where}")
        return self._admit(request, handle=version.ref, targets=[h.name for h in hosts], done=[])

    def _placement_payload(self, job: Job, host: DeviceHost) -> tuple[str, dict[str, Any]]:
        """The host task for this step of a load or unload job."""
        if job.syscall == "unload":
            return "unload", {"handle": job.args["handle"]}
        options: dict[str, Any] = dict(job.args["options"])
        if "stage" in host.role:  # a pipeline stage loads its slice of the layers
            options.update(stage=host.role["stage"], stages=host.role["stages"])
        if host.name in job.args["tune"]:
            options["tune"] = [list(shape) for shape in TUNE_SHAPES]
        return "load", {"handle": job.args["handle"], "path": job.args["path"],
                        "options": options, "memory": job.args["memory"]}

    def _on_placed(self, host: DeviceHost, op: str, payload: dict[str, Any],
                   info: dict[str, Any], jobs: list[Job]) -> None:
        """A load or unload finished on ``host``: update state, then advance its jobs."""
        handle = payload["handle"]
        if op == "load":
            timings = info.pop("timings", None)
            host.loaded[handle] = info
            host.wanted[handle] = {"path": payload["path"], "memory": payload["memory"],
                                   "options": {k: v for k, v in payload["options"].items()
                                               if k != "tune"}}
            if timings:
                self.costs.record(handle, host.name, timings)
                self._save_tuning(host, handle, payload["options"]["precision"], timings)
        else:
            host.loaded.pop(handle, None)
            host.wanted.pop(handle, None)
            self.costs.forget(handle, host.name)
            self._fail_orphans()
            self._retire_host(host, handle)
        for job in jobs:
            job.args["done"].append(job.args["targets"].pop(0))
            if job.args["targets"]:
                job.transition(JobState.QUEUED)  # on to the next host
                job.attempts = 0
                self.scheduler.push(job)
            elif job.syscall in ("promote", "rollback"):
                self._promoted(job)
            elif op == "load":
                self._finish(job, self._placements(handle, [self._hosts()[n]
                                                            for n in job.args["done"]]))
            else:
                self._finish(job, {"model": handle, "devices": job.args["done"]})

    def _save_tuning(self, host: DeviceHost, handle: str, precision: str,
                     timings: dict[str, float]) -> None:
        """Keep a load's measured timings for the next kernel. They are a cache: if they
        cannot be written (a full disk), the load still succeeds and the next one measures
        again."""
        name, _, number = handle.rpartition(":")
        try:
            self.registry.save_tuning(self.registry.resolve(name, int(number)), host.name,
                                      machine_id(precision, host.threads, host.streams), timings)
        except KernelError as exc:
            log.warning("timings of %s on %s not kept: %s", handle, host.name, exc.message)

    def _placements(self, handle: str, hosts: list[DeviceHost]) -> dict[str, Any]:
        loaded = [h for h in hosts if handle in h.loaded]
        info = loaded[0].loaded[handle] if loaded else {}
        return {"model": handle, "devices": [h.name for h in loaded],
                "precision": {h.name: h.loaded[handle].get("precision", "f32") for h in loaded},
                **{k: v for k, v in info.items() if k != "precision"}}

    def _batching(self, job: Job) -> BatchingConfig:
        """The knobs of the driver that would run this job fastest (kernel defaults if none)."""
        if job.syscall == "generate":
            return GENERATE_BATCHING
        hosts = self._hosts()
        candidates = [hosts[name] for name in self._candidates(job) if name in hosts]
        if job.syscall != "infer" or not candidates:
            return self.batching
        best = min(candidates, key=lambda host: self._cost([job], host.name))
        return best.spec.batching or self.batching

    def _cost(self, jobs: list[Job], device: str) -> float:
        """Predicted ms of the hardware a batch takes on a device (0 for work that is not an
        infer batch): its timed run divided by the host's streams, which run beside it."""
        first = jobs[0]
        if first.syscall != "infer":
            return 0.0
        host = self._hosts().get(device)
        streams = host.streams if host is not None else 1
        return self.costs.predict(first.args["handle"], device, *batch_shape(jobs)) / streams

    def _models(self, request: Request) -> dict[str, Any]:
        serving = self.registry.serving()
        rows = []
        for version in self.registry.versions():
            rows.append({
                **version.describe(), "serving": serving.get(version.model) == version.version,
                "loaded_on": [h.name for h in self._hosts().values() if version.ref in h.loaded],
                "timings_ms": {host: table for (handle, host), table in self.costs.timings.items()
                               if handle == version.ref},
            })
        return {"models": rows}


def _export_error(stderr: str) -> KernelError:
    """The KernelError an export subprocess reported (exit 2) on its last line of stderr,
    ``error: CODE: message`` (e.g. INTERNAL "the disk is full: ..."); BAD_REQUEST with
    that line if it names no code."""
    last = (stderr.strip().splitlines() or ["export failed"])[-1].removeprefix("error: ")
    code, sep, message = last.partition(": ")
    if sep and code in ErrorCode.__members__:
        return KernelError(code, message[-500:])
    return KernelError(ErrorCode.BAD_REQUEST, last[-500:])
