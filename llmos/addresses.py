"""Where a kernel lives: its home folder, its default address, and what counts as local.

Re-exported from :mod:`llmos.kernel.config` for clients and tools (the shell, the gateway).
"""

from llmos.kernel.config import default_address, default_home, is_local, is_loopback_host

__all__ = ["default_address", "default_home", "is_local", "is_loopback_host"]
