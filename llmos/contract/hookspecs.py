"""Every hook llmos calls, in one place (documented for plugin authors in docs/hooks.md).

Hooks are called with keyword arguments. A plugin implements any subset with
``@llmos.hookimpl``; built-in plugins use exactly the same hooks. Plugins register from the
``llmos`` entry-point group (point it at a module, not a class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .jobs import Job
    from .parallel import Plan
    from .recipes import StepRegistry, UpdateMethodRegistry
    from .registries import DriverRegistry, PolicyRegistry, SessionRegistry, SourceRegistry

hookspec = pluggy.HookspecMarker("llmos")
#: Marker for hook implementations (also exported as ``llmos.hookimpl``).
hookimpl = pluggy.HookimplMarker("llmos")


# --- registration: called once per kernel, at start-up -----------------------------------


@hookspec
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    """Add device drivers with ``drivers.add(DriverSpec(...))``.

    A :class:`~llmos.kernel.registries.DriverSpec` names the driver class by qualname
    (``"package.module:Class"``), so heavy imports happen only in the driver-host worker that
    runs it. ``probe()`` must be cheap (no heavy import); it returns the device names the
    driver can serve here, or an empty list with the reason in ``unavailable_reason``.

    :param drivers: the kernel's driver registry.
    """


@hookspec
def llmos_register_policies(policies: PolicyRegistry) -> None:
    """Add scheduling policies with ``policies.add(name, factory)``.

    ``factory()`` returns an object with ``rank(job, now) -> tuple``: the scheduler
    runs queued jobs in ascending rank order. The kernel's ``--policy`` option picks one.

    :param policies: the kernel's policy registry.
    """


@hookspec
def llmos_register_model_sources(sources: SourceRegistry) -> None:
    """Add named model sources for ``models import NAME`` with ``sources.add(ModelSource(...))``.

    A source locates a Hugging Face folder (config.json, safetensors, tokenizer) shipped
    inside an installed package; nothing is ever downloaded.

    :param sources: the kernel's model-source registry.
    """


@hookspec
def llmos_register_compression_steps(steps: StepRegistry) -> None:
    """Add compression methods for ``compress`` recipes with ``steps.add(StepSpec(...))``.

    A :class:`~llmos.kernel.recipes.StepSpec` names its function by qualname
    (``"package.module:function"``) and declares its parameters, which the kernel checks
    before it creates a job. The function runs in the driver host that compresses:
    ``function(candidate, params, context) -> candidate`` transforms a
    :class:`~llmos.plugins.compression.candidate.Candidate` (a torch model, or an exported
    graph) and may add entries to ``candidate.notes`` for the report.

    :param steps: the kernel's compression-step registry.
    """


@hookspec
def llmos_register_update_methods(methods: UpdateMethodRegistry) -> None:
    """Add incremental-learning methods for ``update`` with ``methods.add(StepSpec(...))``.

    The :class:`~llmos.kernel.recipes.StepSpec` names its function by qualname and declares
    its parameters, which the kernel checks before it creates a job. The function runs in
    the driver host that learns: ``function(model, params) -> Trainable`` takes the serving
    version's torch classifier and returns what to optimise and how to save the result (see
    :mod:`llmos.plugins.learning.methods`); replay of old data, distillation from the
    current version, the quality gate and the promotion are the kernel's, the same for
    every method.

    :param methods: the kernel's update-method registry.
    """


@hookspec
def llmos_register_sessions(sessions: SessionRegistry) -> None:
    """Add the sessions of long-running jobs with ``sessions.add(SessionSpec(...))``.

    A :class:`~llmos.kernel.registries.SessionSpec` names a session class by qualname
    (``"package.module:Class"``) under the name the kernel asks for: ``compress``,
    ``update`` (their jobs) and ``ddp`` (data-parallel ``train``). The kernel names the
    class in each task of such a job; only the driver host that runs the job imports it,
    starts it with ``Class.start(spec, threads)`` and runs it in quanta (the contract is
    :class:`~llmos.drivers.sessions.Session`), so drivers know no plugin.

    :param sessions: the kernel's session registry; names must be unique.
    """


# --- decisions: firstresult, the built-in answer is trylast ------------------------------


@hookspec(firstresult=True)
def llmos_plan_parallelism(syscall: str, args: dict[str, Any],
                           devices: list[dict[str, Any]]) -> Plan | None:
    """Choose how a ``load`` or ``train`` request runs in parallel.

    Called on the scheduling thread when the request arrives, before a job exists. Return
    a :class:`~llmos.kernel.parallel.Plan` (replicas and pipeline stages for ``load``; the
    DDP world size and local ranks for ``train``), or None to let the next implementation
    decide. Raise ``KernelError(BAD_REQUEST, ...)`` to refuse the request. The built-in
    plan (``llmos.plugins.parallel``, ``trylast``) follows the request's own arguments and
    checks them against the devices; a plugin may override it.
    Stops at the first non-None result.

    :param syscall: ``"load"`` or ``"train"``.
    :param args: the request's validated arguments (read-only).
    :param devices: the driver hosts, as the ``devices`` syscall describes them.
    :return: the plan, or None.
    """


# --- notifications -----------------------------------------------------------------------


@hookspec
def llmos_job_finished(job: Job) -> None:
    """Called in the kernel's scheduling thread when a job reaches a final state.

    Must return quickly (it runs on the scheduling loop); exceptions are logged and ignored.

    :param job: the finished job (state DONE, FAILED, CANCELLED or TIMED_OUT).
    """
