"""Kernel configuration and where things live (LLMOS_HOME, the kernel's address)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from llmos.contract.protocol import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode, KernelError

from .scheduler import BatchingConfig

#: Longest path a Unix socket name may have on Linux (sun_path is 108 bytes with the NUL).
_IPC_PATH_MAX = 107


def default_home() -> Path:
    """``LLMOS_HOME``, else ``~/.llmos``."""
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


def default_address(home: Path | None = None) -> str:
    """``LLMOS_ADDRESS``, else an ipc socket in the home's private (0700) run folder."""
    home = home or default_home()
    return os.environ.get("LLMOS_ADDRESS") or f"ipc://{home / 'run' / 'kernel.sock'}"


def is_local(address: str) -> bool:
    """True for ipc and loopback TCP; False for any other TCP; KernelError if malformed."""
    if address.startswith("ipc://"):
        if len(address) - len("ipc://") > _IPC_PATH_MAX:
            raise KernelError(ErrorCode.BAD_REQUEST, f"ipc path too long (>{_IPC_PATH_MAX}): {address}")
        return True
    if address.startswith("tcp://"):
        return is_loopback_host(urlsplit(address).hostname or "")
    raise KernelError(ErrorCode.BAD_REQUEST, f"address must be ipc://PATH or tcp://HOST:PORT: {address}")


@dataclass(slots=True)
class KernelConfig:
    """Everything a kernel is started with. Limits bound memory: nothing grows unbounded."""

    home: Path = field(default_factory=default_home)
    address: str = ""
    #: Scheduling policy plugin name.
    policy: str = "priority"
    #: Devices to start as ``driver:device`` (e.g. ``torch:cpu``); empty means every probed one.
    devices: tuple[str, ...] = ()
    #: Compute threads per driver host.
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Batches each driver host may run at once, its threads split among them (a driver
    #: that cannot grants 1): more throughput under load, longer lone batches.
    streams: int = 1
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Unfinished jobs one client may have; past it, BUSY at once.
    max_jobs_per_client: int = 256
    #: Unfinished jobs in the whole kernel.
    max_jobs: int = 4096
    #: Bytes of requests one client's unfinished jobs may hold; past it, BUSY at once.
    max_bytes_per_client: int = 256 * 2**20
    #: Bytes of requests all unfinished jobs may hold together.
    max_bytes: int = 2 * 2**30
    #: Finished jobs remembered for `jobs` / `job`.
    history: int = 1000
    #: Batching of drivers without knobs of their own: adaptive by default (the batch size
    #: at most ``max_batch_size``, picked with the queue delay from the observed load).
    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(adaptive=True))
    #: Bytes of models per hardware; None means 80% of its memory.
    memory_budget: int | None = None
    #: A ready host silent this long is declared dead.
    heartbeat_timeout: float = 10.0
    #: A host must send READY within this long of being spawned.
    start_timeout: float = 180.0
    #: CURVE encryption and key allowlist on the client socket (forced beyond loopback).
    curve: bool = False
    #: Load again at start what was loaded when the kernel last stopped (kept in the
    #: registry's ``placements`` table).
    restore: bool = True
    #: Start an ``update`` of a classifier once this many feedback examples arrived since
    #: its last one (0: only on request).
    update_after: int = 0

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        self.address = self.address or default_address(self.home)
        if not is_local(self.address) and not self.curve:
            raise KernelError(
                ErrorCode.DENIED,
                f"refusing to listen on {self.address} without authentication: beyond loopback "
                "the kernel needs CURVE (--curve; create keys with `llmos keys create` and "
                "allow clients with `llmos keys allow`)")
        if self.curve:
            check_curve_keys(self.home)
        if self.max_jobs_per_client < 1 or self.max_jobs < 1:
            raise ValueError("queue limits must be positive")

    @property
    def run_dir(self) -> Path:
        """Sockets and pid file; created 0700 so other local users cannot connect."""
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


def check_curve_keys(home: Path) -> None:
    """Unless ``home`` has the kernel's CURVE key pair (else KernelError(NOT_FOUND)) and at
    least one allowed client key (else KernelError(DENIED)), each saying how to make them:
    without both a ``--curve`` kernel could answer no one (docs/security.md)."""
    from .security import KeyStore  # here: every client imports this module, few need keys

    store = KeyStore(home)
    how = ("make the kernel's key and a client's with `llmos keys create --client NAME`, "
           f"then allow the client with `llmos keys allow NAME {store.root / 'clients' / 'NAME.key'}`"
           " (docs/security.md)")
    if not (store.root / "server.key_secret").exists():
        raise KernelError(ErrorCode.NOT_FOUND, f"--curve: there is no kernel key in {store.root}: {how}")
    if not store.allowed():
        raise KernelError(ErrorCode.DENIED, f"--curve: no client key is allowed in "
                          f"{store.allowed_dir}, so no one could connect: {how}")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
