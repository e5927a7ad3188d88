"""Plugin methods the kernel checks before any work: compression steps and update methods.

A recipe is an ordered list of steps, each a map ``{"step": NAME, PARAM: VALUE, ...}``.
Plugins add steps through ``llmos_register_compression_steps(steps)`` with
``steps.add(StepSpec(...))``. A :class:`StepSpec` names its function by qualname, so the
kernel validates recipes without importing torch; the function is imported and run only in
the driver host that compresses (see :mod:`llmos.plugins.compression.session`).

Update methods (``llmos_register_update_methods``) use the same :class:`StepSpec`: a
function named by qualname, run in the driver host that learns (see
:mod:`llmos.plugins.learning.session`), and parameters checked in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import Arg

from .registries import NamedRegistry

#: Most steps in one recipe.
MAX_STEPS = 16


@dataclass(frozen=True, slots=True)
class StepSpec:
    """A compression step or an update method.

    ``qualname`` (``"package.module:function"``) names the function the driver host runs:
    for a step, ``function(candidate, params, context) -> candidate`` (see
    :mod:`llmos.plugins.compression.candidate`); for an update method, see
    :mod:`llmos.plugins.learning.methods`. ``params`` are checked like syscall arguments,
    defaults filled in, before a job is created.
    """

    name: str
    qualname: str
    params: tuple[Arg, ...] = ()
    description: str = ""
    #: Checks the parameters together (cheaply): an error message, or None when they fit.
    consistent: Callable[[dict[str, Any]], str | None] = lambda params: None

    def check(self, where: str, given: dict[str, Any]) -> dict[str, Any]:
        """The parameters with defaults; KernelError(BAD_REQUEST) starting with ``where``."""
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                              f"expected {', '.join(sorted(known)) or 'none'}")
        parsed: dict[str, Any] = {}
        for param in self.params:
            value = given.get(param.name)
            parsed[param.name] = param.default if value is None else param.parse(where, value)
        problem = self.consistent(parsed)
        if problem:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where}: {problem}")
        return parsed


class StepRegistry(NamedRegistry[StepSpec]):
    def __init__(self) -> None:
        super().__init__("compression step")

    def add(self, spec: StepSpec) -> None:  # type: ignore[override]
        super().add(spec.name, spec)

    def resolve(self, recipe: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``[{"step", "qualname", "params"}]`` for a recipe; KernelError for an empty or
        too long recipe (BAD_REQUEST), an unknown step (NOT_FOUND) or a bad parameter."""
        if not recipe:
            raise KernelError(ErrorCode.BAD_REQUEST, "compress: the recipe has no steps")
        if len(recipe) > MAX_STEPS:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"compress: the recipe has {len(recipe)} steps (limit {MAX_STEPS})")
        steps = []
        for index, entry in enumerate(recipe):
            params = dict(entry)
            name = params.pop("step", None)
            if not isinstance(name, str):
                raise KernelError(ErrorCode.BAD_REQUEST,
                                  f"recipe step {index + 1} has no 'step' name")
            spec = self.get(name)
            steps.append({"step": name, "qualname": spec.qualname,
                          "params": spec.check(f"recipe step {index + 1} ({name})", params)})
        return steps


class UpdateMethodRegistry(NamedRegistry[StepSpec]):
    def __init__(self) -> None:
        super().__init__("update method")

    def add(self, spec: StepSpec) -> None:  # type: ignore[override]
        super().add(spec.name, spec)

    def resolve(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """``{"method", "qualname", "params"}``; KernelError NOT_FOUND for an unknown
        method, BAD_REQUEST for a bad parameter."""
        spec = self.get(method)
        return {"method": method, "qualname": spec.qualname,
                "params": spec.check(f"update method {method}", params)}
