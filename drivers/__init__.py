"""Device drivers. Each runs inside a driver-host worker process supervised by the kernel."""
