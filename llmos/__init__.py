"""llmos: an operating system for language models.

The public facade: ``Client`` (sync), ``AsyncClient`` (asyncio), ``KernelError``,
``hookimpl`` for plugin authors, and ``__version__``. The ``llmos`` command lives in
``llmos.shell.cli``.
"""

__version__ = "0.1.0"

from llmos.contract.hookspecs import hookimpl  # noqa: E402
from llmos.contract.protocol import ErrorCode, KernelError  # noqa: E402
from llmos.kernel.client import AsyncClient, Client  # noqa: E402

__all__ = ["AsyncClient", "Client", "ErrorCode", "KernelError", "__version__", "hookimpl"]
