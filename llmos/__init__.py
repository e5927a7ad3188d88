"""llmos: an operating system for language models.

The public facade for clients and plugins: ``Client`` (sync), ``AsyncClient`` (asyncio),
``Pending`` (a request in flight), ``CurveKeys``, ``unpack_result``, ``KernelError`` and
``ErrorCode``, ``hookimpl`` for plugin authors, and ``__version__``. Tools that run or
administer a kernel on this machine use :mod:`llmos.admin`, :mod:`llmos.addresses` and
:mod:`llmos.data`; the shell and the gateway reach the kernel only through these and the
contract layer (an import-linter contract in ``make lint``). The ``llmos`` command lives in
``llmos.shell.cli``.
"""

__version__ = "0.1.0"

from llmos.contract.hookspecs import hookimpl  # noqa: E402
from llmos.contract.protocol import ErrorCode, KernelError  # noqa: E402
from llmos.kernel.client import AsyncClient, Client, CurveKeys, Pending, unpack_result  # noqa: E402

__all__ = ["AsyncClient", "Client", "CurveKeys", "ErrorCode", "KernelError", "Pending",
           "__version__", "hookimpl", "unpack_result"]
