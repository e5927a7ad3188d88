"""The shell's hook (documented for plugin authors in docs/hooks.md).

The shell adds this specification to the plugins' manager it builds (:func:`llmos.shell.app.
plugin_manager`); the kernel never calls the hook. A plugin implements it with
``@llmos.hookimpl`` like any other hook. Each hook named here is also listed in the
``llmos.hooks`` entry-point group (pyproject.toml), so that other processes know the name
belongs to a spec they do not load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .commands import CommandRegistry

hookspec = pluggy.HookspecMarker("llmos")


@hookspec
def llmos_register_shell_commands(commands: CommandRegistry) -> None:
    """Add commands to the interactive shell with ``commands.add(Command(...))``.

    Called once by each shell, at start-up (never by the kernel). A
    :class:`~llmos.shell.commands.Command` has a name, aliases, a help line, its parameters
    (which drive parsing, usage, ``help`` and completion) and a handler that returns data
    (an ``Output``, or a ``JobRequest`` the shell submits); the handler may be named as
    ``"package.module:function"`` so that registering imports nothing heavy.

    :param commands: the shell's command registry; names and aliases must be unique.
    """
