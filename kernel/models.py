"""Model syscalls: import, export, load, unload, models; placement and memory budgets.

``load`` and ``unload`` may touch several driver hosts: such a job visits its
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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError

from . import datasets
from .devices import DeviceHost, HostState, Task
from .jobs import Job, JobState
from .kinds import KERNEL_DEVICE, Core, Handler, JobKind, Request
from .placement import TUNE_SHAPES, check_memory, is_generative, machine_id
from .registry import ModelVersion, check_name
from .swap import serving_hosts

if TYPE_CHECKING:
    from .parallel import Parallel
    from .scheduler import Batch

log = logging.getLogger(__name__)


class ModelOps(JobKind):
    """Handlers and completion logic for everything that changes where models live."""

    def __init__(self, core: Core, parallel: Parallel) -> None:
        super().__init__(core)
        self.parallel = parallel

    def handlers(self) -> dict[str, Handler]:
        return {"models": self._models, "import": self._import, "export": self._export,
                "load": self._load, "unload": self._unload}

    def candidates(self, job: Job) -> list[str]:
        if job.syscall in ("import", "export"):
            return [KERNEL_DEVICE]
        return [job.args["targets"][0]]

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        return self.placement_task(batch.jobs[0], host)

    def kernel_work(self, job: Job) -> Callable[[], dict[str, Any]]:
        work = self._run_import if job.syscall == "import" else self._run_export
        return partial(work, dict(job.args))

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        for job in live:
            if self.advance(job):
                continue
            if task.op == TaskOp.LOAD:
                self.core.finish(job, self.placements(job.args["handle"], [
                    self.core.hosts()[n] for n in job.args["done"]]))
            else:
                self.core.finish(job, {"model": job.args["handle"], "devices": job.args["done"]})

    def orphaned(self, job: Job) -> KernelError | None:
        if job.syscall not in ("load", "unload"):
            return None
        host = self.core.hosts()[job.args["targets"][0]]
        if host.state is not HostState.FAILED:
            return None
        return KernelError(ErrorCode.DEVICE_FAILED, f"device {host.name} has failed: {host.last_error}")

    # --- import and export (kernel pseudo-device) -------------------------------------

    def _import(self, request: Request) -> Job:
        source, path = request.args["source"], request.args["path"]
        if bool(source) == bool(path):
            raise KernelError(ErrorCode.BAD_REQUEST, "import: give exactly one of source or path")
        if source:
            self.core.ext.sources.get(source)  # NOT_FOUND with the known names
        name = request.args["name"] or source or Path(path).name.lower()
        return self.core.admit(request, name=check_name(name))

    def _export(self, request: Request) -> Job:
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        return self.core.admit(request, path=str(version.path), handle=version.ref)

    def _run_import(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args["source"]:
            folder = Path(args["path"]).expanduser()
            recipe = {"op": "import", "path": str(folder)}
            version, created = self.core.registry.import_folder(args["name"], folder, recipe)
            return {"created": created, **version.describe()}
        source = self.core.ext.sources.get(args["source"])
        located = source.locate()
        recipe = {"op": "import", "source": args["source"]}
        if source.convert is None:
            version, created = self.core.registry.import_folder(args["name"], located, recipe)
            return {"created": created, **version.describe()}
        with self.core.registry.scratch(args["name"]) as out:
            source.convert(located, out)
            version, created = self.core.registry.import_folder(args["name"], out, recipe, move=True)
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

    def targets(self, device: str | None, driver: str | None,
                 generative: bool = False) -> list[DeviceHost]:
        """The hosts a load may use: one named device, one driver's, or every usable one
        (for a generative model: every one whose driver generates)."""
        hosts = self.core.hosts()
        if generative:
            makers = sorted({h.spec.name for h in hosts.values() if h.spec.generates})
            named = hosts[device].spec if device in hosts else (
                self.core.ext.drivers.get(driver) if driver is not None else None)
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
            spec = self.core.ext.drivers.get(driver)  # NOT_FOUND with the known drivers
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

    def _load(self, request: Request) -> Job | dict[str, Any]:
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        generative = is_generative(version.path)
        plan = self.parallel.plan("load", request.args)
        parallel = plan.replicas > 1 or plan.stages > 1
        if parallel:
            hosts = self.parallel.hosts_for(version, plan, request.args["device"], request.args["driver"])
        else:
            hosts = serving_hosts(version, self.targets(request.args["device"],
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
            return self.placements(version.ref, hosts)
        need = check_memory(version, todo, self.core.hosts().values(),
                            self.core.config.memory_budget)
        precision = request.args["precision"]
        cached: set[str] = set()
        for host in todo:
            machine = machine_id(precision, host.threads, host.streams)
            if timings := self.core.registry.tuning(version, machine).get(host.name):
                self.core.costs.record(version.ref, host.name, timings)
                cached.add(host.name)
        tune = [] if generative or parallel else [h.name for h in todo if h.name not in cached]
        return self.core.admit(
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
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        hosts = [h for h in self.core.hosts().values() if version.ref in h.wanted
                 and request.args["device"] in (None, h.name)]
        if not hosts:
            where = request.args["device"] or "any device"
            raise KernelError(ErrorCode.NOT_FOUND, f"{version.ref} is not loaded on {where}")
        return self.core.admit(request, handle=version.ref, targets=[h.name for h in hosts], done=[])

    def placement_task(self, job: Job, host: DeviceHost) -> Task:
        """The host task for this step of a load or unload job."""
        if job.syscall == "unload":
            return Task(TaskOp.UNLOAD, {"handle": job.args["handle"]}, [job])
        options: dict[str, Any] = dict(job.args["options"])
        if "stage" in host.role:  # a pipeline stage loads its slice of the layers
            options.update(stage=host.role["stage"], stages=host.role["stages"])
        if host.name in job.args["tune"]:
            options["tune"] = [list(shape) for shape in TUNE_SHAPES]
        return Task(TaskOp.LOAD, {"handle": job.args["handle"], "path": job.args["path"],
                                  "options": options, "memory": job.args["memory"]}, [job])

    def placed(self, host: DeviceHost, op: str, payload: dict[str, Any],
               info: dict[str, Any]) -> None:
        """A load or unload finished on ``host`` (a job's step, or the reload of a host that
        restarted): record where the model lives now."""
        handle = payload["handle"]
        if op == TaskOp.LOAD:
            timings = info.pop("timings", None)
            host.loaded[handle] = info
            host.wanted[handle] = {"path": payload["path"], "memory": payload["memory"],
                                   "options": {k: v for k, v in payload["options"].items()
                                               if k != "tune"}}
            self.remember(host, handle)
            if timings:
                self.core.costs.record(handle, host.name, timings)
                self._save_tuning(host, handle, payload["options"]["precision"], timings)
        else:
            host.loaded.pop(handle, None)
            host.wanted.pop(handle, None)
            self.remember(host, handle)
            self.core.costs.forget(handle, host.name)
            self.core.fail_orphans()
            self.parallel.retire_host(host, handle)

    def remember(self, host: DeviceHost, handle: str) -> None:
        """Record in the registry whether ``handle`` is wanted on ``host`` (a restarted
        kernel loads it there again, :meth:`restore`). The record is a convenience: if it
        cannot be written (a full disk), the load or unload still stands."""
        try:
            if handle in host.wanted and not host.role:
                self.core.registry.save_placement(host.name, handle, host.wanted[handle])
            else:
                self.core.registry.drop_placement(host.name, handle)
        except KernelError as exc:
            log.warning("placement of %s on %s not recorded: %s", handle, host.name, exc.message)

    def restore(self) -> None:
        """At start: every host wants again what it had loaded when the kernel stopped (the
        loads are sent when the host is ready). A version gone from the registry, or whose
        files moved, is forgotten; a host not started this time keeps its record."""
        hosts = self.core.hosts()
        for name, wanted in self.core.registry.placements().items():
            if name not in hosts:
                continue
            for handle, payload in wanted.items():
                model, _, number = handle.rpartition(":")
                try:
                    version = self.core.registry.resolve(model, int(number))
                except (KernelError, ValueError):
                    version = None
                if version is None or str(version.path) != payload["path"]:
                    self.remember(hosts[name], handle)  # not wanted: dropped
                    continue
                hosts[name].wanted[handle] = payload
                log.info("reloading %s on %s (loaded when the kernel stopped)", handle, name)

    def advance(self, job: Job) -> bool:
        """A placement job (load, unload, promote, rollback) is done on its current host:
        queue it for the next one and return True, or False when that was the last."""
        job.args["done"].append(job.args["targets"].pop(0))
        if not job.args["targets"]:
            return False
        job.transition(JobState.QUEUED)  # on to the next host
        job.attempts = 0
        self.core.scheduler.push(job)
        return True

    def _save_tuning(self, host: DeviceHost, handle: str, precision: str,
                     timings: dict[str, float]) -> None:
        """Keep a load's measured timings for the next kernel. They are a cache: if they
        cannot be written (a full disk), the load still succeeds and the next one measures
        again."""
        name, _, number = handle.rpartition(":")
        try:
            self.core.registry.save_tuning(self.core.registry.resolve(name, int(number)), host.name,
                                      machine_id(precision, host.threads, host.streams), timings)
        except KernelError as exc:
            log.warning("timings of %s on %s not kept: %s", handle, host.name, exc.message)

    def placements(self, handle: str, hosts: list[DeviceHost]) -> dict[str, Any]:
        loaded = [h for h in hosts if handle in h.loaded]
        info = loaded[0].loaded[handle] if loaded else {}
        return {"model": handle, "devices": [h.name for h in loaded],
                "precision": {h.name: h.loaded[handle].get("precision", "f32") for h in loaded},
                **{k: v for k, v in info.items() if k != "precision"}}

    def _models(self, request: Request) -> dict[str, Any]:
        serving = self.core.registry.serving()
        rows = []
        for version in self.core.registry.versions():
            rows.append({
                **version.describe(), "serving": serving.get(version.model) == version.version,
                "loaded_on": [h.name for h in self.core.hosts().values() if version.ref in h.loaded],
                "timings_ms": {host: table for (handle, host), table in self.core.costs.timings.items()
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
