"""Name-keyed registries that plugins fill through the ``llmos_register_*`` hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from llmos.contract.protocol import ErrorCode, KernelError

from .scheduler import BatchingConfig

T = TypeVar("T")


class NamedRegistry(Generic[T]):
    """A mapping from unique names to items; ``kind`` names the registry in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item

    def get(self, name: str) -> T:
        """The item called ``name``; KernelError(NOT_FOUND) naming the known ones otherwise."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KernelError(
                ErrorCode.NOT_FOUND, f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """A device driver, known by name; the class is imported only inside its driver host."""

    name: str
    #: ``"package.module:Class"`` of a :class:`llmos.drivers.base.Driver` subclass.
    qualname: str
    #: Cheap check: the device names this driver can serve here (e.g. ``["cpu"]``).
    probe: Callable[[], list[str]]
    description: str = ""
    #: Why ``probe()`` returned nothing, for the ``drivers`` syscall.
    unavailable_reason: Callable[[], str] = field(default=lambda: "")
    #: Dynamic batching knobs that suit this driver; None means the kernel's defaults.
    batching: BatchingConfig | None = None
    #: The driver implements ``train`` and ``evaluate`` (see drivers/base.py).
    trains: bool = False
    #: The driver serves causal language models (``generate``, see drivers/base.py).
    generates: bool = False


class DriverRegistry(NamedRegistry[DriverSpec]):
    def __init__(self) -> None:
        super().__init__("driver")

    def add(self, spec: DriverSpec) -> None:  # type: ignore[override]
        super().add(spec.name, spec)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A long-running job's session, known by name (``compress``, ``update``, ``ddp``); the
    kernel names it in the job's tasks and only the driver host imports the class."""

    name: str
    #: ``"package.module:Class"`` of a :class:`llmos.drivers.sessions.Session` class.
    qualname: str
    description: str = ""


class SessionRegistry(NamedRegistry[SessionSpec]):
    def __init__(self) -> None:
        super().__init__("session")

    def add(self, spec: SessionSpec) -> None:  # type: ignore[override]
        super().add(spec.name, spec)


class PolicyRegistry(NamedRegistry[Callable[..., Any]]):
    def __init__(self) -> None:
        super().__init__("scheduling policy")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model shipped inside an installed package, importable by name."""

    name: str
    #: Returns the Hugging Face folder (or, with ``convert``, the file to convert); raises
    #: KernelError(NOT_FOUND) if the package is not installed.
    locate: Callable[[], Path]
    description: str = ""
    #: ``convert(located, out_dir)`` writes a Hugging Face folder into the empty ``out_dir``
    #: (e.g. from GGUF); runs once, at import, off the scheduling thread.
    convert: Callable[[Path, Path], None] | None = None


class SourceRegistry(NamedRegistry[ModelSource]):
    def __init__(self) -> None:
        super().__init__("model source")

    def add(self, source: ModelSource) -> None:  # type: ignore[override]
        super().add(source.name, source)
