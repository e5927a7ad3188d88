"""The contract layer: what every llmos process agrees on, and nothing else.

The wire protocol (:mod:`.protocol`), the syscall table (:mod:`.syscalls`), the host wire
between the kernel and its driver hosts (:mod:`.hostwire`), the hook specifications
(:mod:`.hookspecs`) and the closed sets clients see (:mod:`.states`). It imports nothing of
llmos beyond itself (an import-linter contract in ``make lint``), so the kernel, drivers,
plugins and the shell can all depend on it and on nothing of each other's insides.
"""
