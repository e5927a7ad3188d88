import argparse

import pytest

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.config import KernelConfig, is_local
from llmos.kernel.scheduler import BatchingConfig
from llmos.kernel.server import KernelServer, add_kernel_options, config_from_args, kernel_argv


@pytest.mark.parametrize("address", ["ipc:///tmp/x.sock", "tcp://127.0.0.1:5555",
                                     "tcp://localhost:1", "tcp://[::1]:7"])
def test_local_addresses(address):
    assert is_local(address)


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555",
                                     "tcp://example.com:80"])
def test_listening_beyond_loopback_needs_curve(address, home):
    assert not is_local(address)
    with pytest.raises(KernelError) as info:
        KernelConfig(home=home, address=address)
    assert info.value.code is ErrorCode.DENIED and "llmos keys create" in info.value.message
    with pytest.raises(KernelError) as no_keys:  # CURVE asked for, but no keys made yet
        KernelServer(KernelConfig(home=home, address=address, curve=True))
    assert no_keys.value.code is ErrorCode.NOT_FOUND and "llmos keys create" in no_keys.value.message


def test_unknown_driver_or_policy_fails_before_anything_starts(home):
    for options in ({"devices": ("nope:cpu",)}, {"policy": "lottery"}):
        with pytest.raises(KernelError) as info:
            KernelServer(KernelConfig(home=home, **options))
        assert info.value.code is ErrorCode.NOT_FOUND
    assert not (home / "run" / "kernel.json").exists()


def test_streams_is_a_kernel_option_from_1_to_64_that_survives_a_detach(capsys):
    parser = argparse.ArgumentParser()
    add_kernel_options(parser)
    args = parser.parse_args(["--streams", "2"])
    assert config_from_args(args).streams == 2
    assert parser.parse_args(kernel_argv(args)).streams == 2  # what a detached start passes on
    assert config_from_args(parser.parse_args([])).streams == 1
    for bad in ("0", "65", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--streams", bad])
        assert "expected a whole number from 1 to 64" in capsys.readouterr().err


def test_batching_is_adaptive_unless_a_knob_is_given_and_survives_a_detach():
    parser = argparse.ArgumentParser()
    add_kernel_options(parser)
    assert config_from_args(parser.parse_args([])).batching == BatchingConfig(adaptive=True)
    for argv, fixed in ((["--max-batch-size", "11"], BatchingConfig(11, 0.002)),
                        (["--max-queue-delay-ms", "8"], BatchingConfig(32, 0.008)),
                        (["--max-batch-size", "11", "--max-queue-delay-ms", "8"],
                         BatchingConfig(11, 0.008))):
        args = parser.parse_args(argv)
        assert config_from_args(args).batching == fixed
        assert config_from_args(parser.parse_args(kernel_argv(args))).batching == fixed
    assert "--max-batch-size" not in kernel_argv(parser.parse_args([]))
