"""Keys, capabilities and the audit log.

Layout under ``LLMOS_HOME/keys`` (mode 0700)::

    server.key, server.key_secret     the kernel's CURVE key pair
    clients/<name>.key[_secret]       key pairs made here for clients (``keys create``)
    allowed/<name>.key                public keys allowed to connect (the allowlist)
    capabilities.json                 {name: ["infer", "train", "admin"]}

With CURVE on, a ZAP authenticator accepts only allowlisted keys and tags each message
with the key's name (ZeroMQ's ``User-Id``): that name is the job owner, and its
capabilities decide which syscalls it may call. Without CURVE (ipc or loopback only),
the local user who can reach the 0700 socket folder is trusted with every capability.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from llmos.contract.protocol import ErrorCode, KernelError

from .registry import write_error, writing

log = logging.getLogger(__name__)

CAPABILITIES = ("infer", "train", "admin")
#: The capability each syscall needs. Syscalls not listed here need none beyond a key.
REQUIRED: dict[str, str] = {
    "infer": "infer", "generate": "infer", "train": "train", "evaluate": "train",
    "learn": "train", "update": "train",
    "import": "admin", "export": "admin", "load": "admin", "unload": "admin",
    "shutdown": "admin", "compress": "admin", "promote": "admin", "rollback": "admin",
}
#: Syscalls written to the audit log.
PRIVILEGED = frozenset({"import", "export", "load", "unload", "train", "learn", "shutdown",
                        "cancel", "renice", "compress", "promote", "update", "rollback"})
#: The owner name of unauthenticated local clients (ipc or loopback without CURVE).
LOCAL = "local"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: a key name (or the local user) and what it may do."""

    name: str
    capabilities: frozenset[str]
    authenticated: bool

    def may(self, capability: str) -> bool:
        return capability in self.capabilities

    def check(self, syscall: str) -> None:
        """KernelError(DENIED) if ``syscall`` needs a capability this principal lacks."""
        needed = REQUIRED.get(syscall)
        if needed and not self.may(needed) and not self.may("admin"):
            raise KernelError(ErrorCode.DENIED, f"{syscall} needs the {needed!r} capability; "
                              f"key {self.name!r} has {', '.join(sorted(self.capabilities)) or 'none'}")


LOCAL_PRINCIPAL = Principal(LOCAL, frozenset(CAPABILITIES), authenticated=False)


@dataclass(slots=True)
class KeyStore:
    """The files under ``home/keys``."""

    home: Path
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.home) / "keys"

    @property
    def allowed_dir(self) -> Path:
        return self.root / "allowed"

    def _ensure(self) -> None:
        for folder in (self.root, self.root / "clients", self.allowed_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    def server_keys(self, create: bool = False) -> tuple[bytes, bytes]:
        """(public, secret) of the kernel; KernelError(NOT_FOUND) saying how to make them."""
        secret_file = self.root / "server.key_secret"
        if not secret_file.exists():
            if not create:
                raise KernelError(ErrorCode.NOT_FOUND, f"no server key in {self.root}: "
                                  "run `llmos keys create` first")
            self._ensure()
            zmq.auth.create_certificates(self.root, "server")
        public, secret = zmq.auth.load_certificate(secret_file)
        assert secret is not None
        return public, secret

    def create_client(self, name: str) -> Path:
        """Make a client key pair under ``clients/``; returns the secret file for the client."""
        check_key_name(name)
        self._ensure()
        public_file, secret_file = zmq.auth.create_certificates(self.root / "clients", name)
        return Path(secret_file)

    def allow(self, name: str, public_key_file: Path, capabilities: list[str]) -> None:
        """Add a client's public key to the allowlist with its capabilities."""
        check_key_name(name)
        unknown = sorted(set(capabilities) - set(CAPABILITIES))
        if unknown or not capabilities:
            raise KernelError(ErrorCode.BAD_REQUEST, f"capabilities must be a non-empty subset "
                              f"of {', '.join(CAPABILITIES)}; got {', '.join(capabilities)}")
        zmq.auth.load_certificate(public_key_file)  # raises if it is not a key file
        self._ensure()
        target = self.allowed_dir / f"{name}.key"
        shutil.copyfile(public_key_file, target)
        table = self.capabilities()
        table[name] = sorted(set(capabilities))
        _write_json(self.root / "capabilities.json", table)

    def capabilities(self) -> dict[str, list[str]]:
        path = self.root / "capabilities.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def allowed(self) -> dict[bytes, str]:
        """z85 public key -> key name, for every allowlisted key."""
        keys: dict[bytes, str] = {}
        for file in sorted(self.allowed_dir.glob("*.key")):
            public, _ = zmq.auth.load_certificate(file)
            keys[public] = file.stem
        return keys


def check_key_name(name: str) -> str:
    if not _NAME.match(name):
        raise KernelError(ErrorCode.BAD_REQUEST, f"invalid key name {name!r}: 1-64 of "
                          "letters, digits, . _ - starting with a letter or digit")
    return name


def _write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically; KernelError(INTERNAL) and no ``.tmp`` left if it fails."""
    tmp = path.with_suffix(".tmp")
    with writing(path.name, path, partial=tmp):
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)


class _NamedKeyAuthenticator(ThreadAuthenticator):
    """ZAP authenticator whose User-Id is the allowlisted key's name, not the raw key."""

    def __init__(self, ctx: zmq.Context, names: dict[bytes, str]) -> None:
        super().__init__(ctx)
        self.names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "unknown")


@dataclass(slots=True)
class CurveServer:
    """CURVE for the kernel's client socket: keys, the ZAP thread, and who is who."""

    store: KeyStore
    authenticator: _NamedKeyAuthenticator | None = None
    table: dict[str, frozenset[str]] = field(default_factory=dict)

    def start(self, ctx: zmq.Context) -> None:
        names = self.store.allowed()
        if not names:
            raise KernelError(ErrorCode.DENIED, "CURVE is on but no client key is allowed: "
                              "run `llmos keys create --client NAME` and `llmos keys allow`")
        self.table = {name: frozenset(caps) for name, caps in self.store.capabilities().items()}
        self.authenticator = _NamedKeyAuthenticator(ctx, names)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(self.store.allowed_dir))

    def secure(self, socket: zmq.Socket) -> None:
        public, secret = self.store.server_keys()
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True

    def principal(self, user_id: str) -> Principal:
        return Principal(user_id, self.table.get(user_id, frozenset()), authenticated=True)

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()


class AuditLog:
    """Append-only JSON lines under ``home/audit.log``: who, what, when, result.

    :meth:`record` never raises: the log is written after the syscall has run (it records
    the outcome), so a log that cannot be written (a full disk) must not take down the
    thread that answers. A failed entry is counted in :attr:`failures` (``stats`` shows it
    as ``audit_failures``), logged once per run of failures, and leaves no half line; the
    next entry that can be written is preceded by a ``LOST`` entry saying how many went
    missing, so a gap in the log is itself on the record (docs/security.md).
    """

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "audit.log"
        self._lock = threading.Lock()
        #: Entries that could not be written since the log was opened.
        self.failures = 0
        #: Entries lost since the last one written, and when the first of them failed.
        self._lost = 0
        self._lost_since = 0.0
        self._last_error = ""

    def record(self, who: str, syscall: str, args: dict[str, Any], result: str) -> bool:
        """Append one entry; True once written, False (counted, logged) if it could not be."""
        now = time.time()
        with self._lock:
            try:
                lines = [self._line(now, who, syscall, args, result)]
                if self._lost:
                    lines.insert(0, self._line(now, "kernel", "audit", {
                        "entries": self._lost, "since": self._lost_since,
                        "error": self._last_error}, "LOST"))
                _append(self.path, "".join(lines))
            except Exception as exc:  # never into the caller: see the class docstring
                self.failures += 1
                self._last_error = write_error("the audit log", self.path, exc).message
                if not self._lost:
                    self._lost_since = now
                    log.error("audit entries are being lost (%s %s by %s): %s",
                              syscall, result, who, self._last_error)
                self._lost += 1
                return False
            if self._lost:
                log.warning("the audit log is written again; %d entries were lost", self._lost)
                self._lost = 0
            return True

    @staticmethod
    def _line(now: float, who: str, syscall: str, args: dict[str, Any], result: str) -> str:
        entry = {"time": now, "who": who, "syscall": syscall,
                 "args": {k: v for k, v in args.items()
                          if v is not None and k not in ("inputs", "examples")},
                 "result": result}
        return json.dumps(entry, default=str) + "\n"

    def read(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` entries (a line that is not JSON, e.g. from an older kernel
        that died mid-write, is skipped)."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries[-limit:]


def _append(path: Path, text: str) -> None:
    """Append ``text`` whole or not at all: after a failed or short write the file is cut
    back to its size before, so no half line is left (one writer: the caller's lock)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except BaseException:
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
