"""The OpenAI-compatible HTTP gateway, a plugin: it adds the ``serve`` shell command.

Registered from the ``llmos`` entry-point group exactly like a third party's plugin (see
pyproject.toml); ``LLMOS_DISABLE_PLUGINS=gateway`` leaves it out. Registering imports
nothing heavy: the server lives in :mod:`llmos.plugins.gateway.http`.
"""

from __future__ import annotations

from llmos.contract.hookspecs import hookimpl
from llmos.shell.commands import Command, CommandRegistry, Param

SERVE = Command(
    "serve", "Serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
    "/v1/chat/completions, /v1/embeddings, /health, /metrics) until Ctrl-C, printing one "
    "access-log line a request on stderr (--no-access-log: none).",
    "llmos.plugins.gateway.command:serve",
    (Param("http", option=True, metavar="HOST:PORT"),
     Param("api_key", option=True, metavar="KEY"),
     Param("no_access_log", "flag", option=True)),
)


@hookimpl
def llmos_register_shell_commands(commands: CommandRegistry) -> None:
    commands.add(SERVE)
