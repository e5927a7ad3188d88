"""The llmos kernel: syscalls over ZeroMQ, jobs, scheduling, driver hosts, registry."""

import pluggy

#: Marker for hook implementations (also exported as ``llmos.hookimpl``).
hookimpl = pluggy.HookimplMarker("llmos")
