"""Running and administering a kernel on this machine: what the ``llmos`` command needs
beyond a client.

``KernelServer`` with its command-line options (``add_kernel_options``, ``config_from_args``,
``kernel_argv``) and its pid record (``read_pid_file``); the CURVE key store and the audit
log under a home (``KeyStore``, ``AuditLog``); and the plugins' manager
(``get_plugin_manager``, with the plugins ``disabled_from_env`` blocked), which a process
other than the kernel extends with its own hook specifications and built-in plugins.
"""

from llmos.kernel.plugins import disabled_from_env, get_plugin_manager
from llmos.kernel.security import AuditLog, KeyStore
from llmos.kernel.server import (
    KernelServer,
    add_kernel_options,
    config_from_args,
    kernel_argv,
    read_pid_file,
)

__all__ = ["AuditLog", "KernelServer", "KeyStore", "add_kernel_options", "config_from_args",
           "disabled_from_env", "get_plugin_manager", "kernel_argv", "read_pid_file"]
