"""Standard output on a full disk (/dev/full answers every write with ENOSPC): a process
that wrapped its streams goes on; one that did not fails at its first print."""

from __future__ import annotations

import io
import subprocess
import sys

from llmos.kernel.output import UnfailingStream

PRINTS = "import sys; print('x' * 100_000); sys.stderr.write('progress\\n'); print('done')"


def run_with_output_on_a_full_disk(code: str) -> subprocess.CompletedProcess[bytes]:
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-c", code], stdout=full, stderr=full, timeout=60)


def test_a_print_to_a_full_disk_fails_an_unwrapped_process():
    assert run_with_output_on_a_full_disk(PRINTS).returncode != 0


def test_a_wrapped_process_prints_to_a_full_disk_and_goes_on():
    code = ("from llmos.kernel.output import keep_output_from_failing; "
            "keep_output_from_failing(); " + PRINTS + "; raise SystemExit(7)")
    assert run_with_output_on_a_full_disk(code).returncode == 7  # reached the end


def test_dropped_writes_are_counted():
    with io.TextIOWrapper(open("/dev/full", "wb", buffering=0), write_through=True) as full:
        stream = UnfailingStream(full)
        assert stream.write("a line\n") == 7
        stream.flush()
        assert stream.dropped == 1
        assert stream.fileno() == full.fileno()
