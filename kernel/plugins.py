"""Building a kernel's plugin manager: built-ins and third-party plugins on one path."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from llmos.contract import hookspecs

from .recipes import StepRegistry, UpdateMethodRegistry
from .registries import DriverRegistry, PolicyRegistry, SourceRegistry

log = logging.getLogger(__name__)

#: Built-in plugins, registered under these names before entry points; block one by name.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "llmos.kernel.scheduler.fifo",
    "llmos.kernel.scheduler.priority",
    "llmos.kernel.sources",
    "llmos.drivers.builtin",
    "llmos.shell.builtin_commands",
    "llmos.plugins.compression",
    "llmos.plugins.learning",
    "llmos.plugins.parallel",
)

ENTRY_POINT_GROUP = "llmos"


def disabled_from_env() -> list[str]:
    """Plugin names listed (comma-separated) in ``LLMOS_DISABLE_PLUGINS``."""
    return [n.strip() for n in os.environ.get("LLMOS_DISABLE_PLUGINS", "").split(",") if n.strip()]


def get_plugin_manager(disabled: Iterable[str] = ()) -> pluggy.PluginManager:
    """A fresh manager: hookspecs, built-ins, then the ``llmos`` entry points; then checked.

    ``disabled`` names plugins (built-in module names or entry-point names) to block.
    """
    pm = pluggy.PluginManager("llmos")
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled)
    for name in blocked:
        pm.set_blocked(name)
    for name in BUILTIN_PLUGINS:
        if name not in blocked:
            pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


@dataclass(slots=True)
class Extensions:
    """What the plugins registered, collected once per kernel."""

    drivers: DriverRegistry
    policies: PolicyRegistry
    sources: SourceRegistry
    compression_steps: StepRegistry
    update_methods: UpdateMethodRegistry


def collect(pm: pluggy.PluginManager) -> Extensions:
    """Call the registration hooks once and return the filled registries."""
    ext = Extensions(DriverRegistry(), PolicyRegistry(), SourceRegistry(), StepRegistry(),
                     UpdateMethodRegistry())
    pm.hook.llmos_register_drivers(drivers=ext.drivers)
    pm.hook.llmos_register_policies(policies=ext.policies)
    pm.hook.llmos_register_model_sources(sources=ext.sources)
    pm.hook.llmos_register_compression_steps(steps=ext.compression_steps)
    pm.hook.llmos_register_update_methods(methods=ext.update_methods)
    return ext


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins (for the ``info`` syscall)."""
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)
