"""The entry-point module: registers the driver by qualname (nothing heavy imported here)."""

from llmos import hookimpl
from llmos.kernel.registries import DriverRegistry, DriverSpec
from llmos.kernel.scheduler import BatchingConfig


@hookimpl
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    drivers.add(DriverSpec(
        name="numpy", qualname="llmos_numpy_driver.driver:NumpyBertDriver",
        probe=lambda: ["cpu"], description="BERT encoders in plain NumPy (example plugin)",
        # NumPy gains little from large batches and their attention matrices cost memory.
        batching=BatchingConfig(max_batch_size=8, max_queue_delay=0.001),
    ))
