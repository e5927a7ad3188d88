"""The llmos kernel: syscalls over ZeroMQ, jobs, scheduling, driver hosts, registry."""
