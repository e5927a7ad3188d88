"""What the scheduling core's mixins share, declared once.

:class:`~llmos.kernel.core.KernelCore` is composed of mixins (control, models, training,
generation, learning, compression) that use the core's state and a few of its methods.
:class:`CoreServices` declares those for all of them, as annotations only: a method body
here (even ``raise NotImplementedError``) would shadow the real method of any class later
in the core's MRO (tests/test_meta.py forbids such stubs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmos.contract.protocol import ErrorCode

    from .config import KernelConfig
    from .core import Request
    from .devices import DeviceHost, DeviceManager
    from .jobs import Job, JobState
    from .plugins import Extensions
    from .registry import Registry
    from .scheduler import Scheduler


class CoreServices:
    """The core's state and methods that its mixins use (provided by KernelCore)."""

    config: KernelConfig
    registry: Registry
    ext: Extensions
    devices: DeviceManager | None
    scheduler: Scheduler
    active: dict[int, Job]
    #: Create and queue a job for a request (KernelError BUSY past a limit).
    _admit: Callable[..., Job]
    #: End a job DONE and reply with ``result`` (and tensor buffers).
    _finish: Callable[..., None]
    #: End a job in ``state`` with an error reply.
    _fail: Callable[[Job, JobState, ErrorCode | str, str], None]
    #: Queue frames for a client (identity first) on the IO thread's outbox.
    _send: Callable[[bytes, list[bytes]], None]
    #: The driver hosts by name.
    _hosts: Callable[[], dict[str, DeviceHost]]
    #: The version a request names, loaded and able to do a task (see KernelCore).
    _loaded_version: Callable[[Request, str, str], Any]
