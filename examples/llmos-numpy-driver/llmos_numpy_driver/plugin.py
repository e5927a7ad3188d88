"""The entry-point module: registers the driver by qualname (nothing heavy imported here)."""

from llmos import hookimpl
from llmos.kernel.registries import DriverRegistry, DriverSpec


@hookimpl
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    drivers.add(DriverSpec(
        name="numpy", qualname="llmos_numpy_driver.driver:NumpyBertDriver",
        probe=lambda: ["cpu"], description="BERT encoders in plain NumPy (example plugin)",
    ))
