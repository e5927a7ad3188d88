import pytest

from llmos.kernel.config import KernelConfig, check_local
from llmos.kernel.protocol import ErrorCode, KernelError
from llmos.kernel.server import KernelServer


@pytest.mark.parametrize("address", ["ipc:///tmp/x.sock", "tcp://127.0.0.1:5555",
                                     "tcp://localhost:1", "tcp://[::1]:7"])
def test_local_addresses_are_allowed(address):
    assert check_local(address) == address


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555",
                                     "tcp://example.com:80"])
def test_listening_beyond_loopback_is_refused(address):
    with pytest.raises(KernelError) as info:
        check_local(address)
    assert info.value.code is ErrorCode.DENIED and "CURVE" in info.value.message


def test_unknown_driver_or_policy_fails_before_anything_starts(home):
    for options in ({"devices": ("nope:cpu",)}, {"policy": "lottery"}):
        with pytest.raises(KernelError) as info:
            KernelServer(KernelConfig(home=home, **options))
        assert info.value.code is ErrorCode.NOT_FOUND
    assert not (home / "run" / "kernel.json").exists()
