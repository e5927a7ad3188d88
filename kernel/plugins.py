"""Building a kernel's plugin manager: built-ins and third-party plugins on one path."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import pluggy

from llmos.contract import hookspecs

from .recipes import StepRegistry, UpdateMethodRegistry
from .registries import DriverRegistry, PolicyRegistry, SessionRegistry, SourceRegistry

log = logging.getLogger(__name__)

#: Built-in plugins, registered under these names before entry points; block one by name.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "llmos.kernel.scheduler.fifo",
    "llmos.kernel.scheduler.priority",
    "llmos.kernel.sources",
    "llmos.drivers.builtin",
    "llmos.plugins.compression",
    "llmos.plugins.learning",
    "llmos.plugins.parallel",
)

ENTRY_POINT_GROUP = "llmos"
#: Entry points naming the hooks that a process other than the kernel declares: the entry's
#: name is the hook, its value the module of the spec (the shell's
#: ``llmos_register_shell_commands``). A manager without that spec accepts implementations
#: of these hooks unchecked, without importing the module: the process that calls the hook
#: checks them.
HOOKS_GROUP = "llmos.hooks"


def disabled_from_env() -> list[str]:
    """Plugin names listed (comma-separated) in ``LLMOS_DISABLE_PLUGINS``."""
    return [n.strip() for n in os.environ.get("LLMOS_DISABLE_PLUGINS", "").split(",") if n.strip()]


def get_plugin_manager(disabled: Iterable[str] = (), *, specs: Iterable[ModuleType] = (),
                       builtins: Iterable[str] = ()) -> pluggy.PluginManager:
    """A fresh manager: the contract's hook specifications and ``specs``, the built-in
    plugins (BUILTIN_PLUGINS, then ``builtins``), then the ``llmos`` entry points; then
    checked (:func:`check_hooks`).

    ``disabled`` names plugins (built-in module names or entry-point names) to block.
    ``specs`` and ``builtins`` are a process's own hook specifications and built-in plugins
    (module names): the shell adds its hook and its built-in commands.
    """
    pm = pluggy.PluginManager("llmos")
    pm.add_hookspecs(hookspecs)
    for spec in specs:
        pm.add_hookspecs(spec)
    blocked = set(disabled)
    for name in blocked:
        pm.set_blocked(name)
    for name in (*BUILTIN_PLUGINS, *builtins):
        if name not in blocked:
            pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """pluggy's ``check_pending``, except for the hooks another process declares
    (HOOKS_GROUP): PluginValidationError for an implementation of a hook that no spec
    declares (a typo such as ``llmos_register_polices``). Implementations of the hooks with
    a spec were checked against it when they registered."""
    elsewhere = {ep.name for ep in importlib.metadata.entry_points(group=HOOKS_GROUP)}
    for name, caller in vars(pm.hook).items():
        if name.startswith("_") or caller.has_spec() or name in elsewhere:
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                raise pluggy.PluginValidationError(
                    impl.plugin, f"unknown hook {name!r} in plugin {impl.plugin_name!r}")


@dataclass(slots=True)
class Extensions:
    """What the plugins registered, collected once per kernel."""

    drivers: DriverRegistry
    policies: PolicyRegistry
    sources: SourceRegistry
    compression_steps: StepRegistry
    update_methods: UpdateMethodRegistry
    #: Sessions of long-running jobs, named by qualname in their tasks (compress, update, ddp).
    sessions: SessionRegistry


def collect(pm: pluggy.PluginManager) -> Extensions:
    """Call the registration hooks once and return the filled registries."""
    ext = Extensions(DriverRegistry(), PolicyRegistry(), SourceRegistry(), StepRegistry(),
                     UpdateMethodRegistry(), SessionRegistry())
    pm.hook.llmos_register_drivers(drivers=ext.drivers)
    pm.hook.llmos_register_policies(policies=ext.policies)
    pm.hook.llmos_register_model_sources(sources=ext.sources)
    pm.hook.llmos_register_compression_steps(steps=ext.compression_steps)
    pm.hook.llmos_register_update_methods(methods=ext.update_methods)
    pm.hook.llmos_register_sessions(sessions=ext.sessions)
    return ext


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins (for the ``info`` syscall)."""
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)
