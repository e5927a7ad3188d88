"""The ``llmos`` command against real kernels."""

import json
import os
import subprocess
import sys

import pytest

from llmos.kernel.server import read_pid_file


def llmos(*args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "llmos.shell", *args], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"llmos {' '.join(args)} -> {result.returncode}\n{result.stderr}")
    return result


def test_everyday_commands(minilm_kernel):
    address = ["--address", minilm_kernel.address]
    assert "pong" in llmos(*address, "ping").stdout
    models = json.loads(llmos(*address, "--json", "models").stdout)
    assert any(m["model"] == "minilm" and m["loaded_on"] == ["torch:cpu"] for m in models)
    vectors = json.loads(llmos(*address, "--json", "embed", "minilm", "hello", "world").stdout)
    assert len(vectors["embeddings"]) == 2 and len(vectors["embeddings"][0]) == 384
    jobs = json.loads(llmos(*address, "--json", "jobs", "--all").stdout)
    assert any(j["syscall"] == "infer" and j["state"] == "DONE" for j in jobs)
    assert "torch:cpu" in llmos(*address, "devices").stdout


def test_errors_are_one_line_with_a_code_and_a_nonzero_status(minilm_kernel):
    result = llmos("--address", minilm_kernel.address, "embed", "no-such-model", "x", check=False)
    assert result.returncode == 2
    assert "NOT_FOUND" in result.stderr and "no-such-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_kernel_start_detach_status_stop(home):
    env = {"LLMOS_HOME": str(home)}
    llmos("kernel", "start", "--detach", "--devices", "torch:cpu", env=env)
    record = read_pid_file(home)
    assert record and record["address"].startswith("ipc://")
    status = json.loads(llmos("--json", "kernel", "status", env=env).stdout)
    assert status["pid"] == record["pid"] and status["home"] == str(home.resolve())
    assert "kernel stopped" in llmos("kernel", "stop", env=env).stdout
    assert read_pid_file(home) is None
    result = llmos("ping", env=env, check=False)
    assert result.returncode == 2 and "TIMEOUT" in result.stderr


def test_a_second_kernel_on_the_same_home_is_refused(minilm_kernel):
    from llmos.contract.protocol import ErrorCode, KernelError
    from llmos.kernel.config import KernelConfig
    from llmos.kernel.server import KernelServer

    with pytest.raises(KernelError) as info:
        KernelServer(KernelConfig(home=minilm_kernel.home))
    assert info.value.code is ErrorCode.BUSY


def test_train_evaluate_datasets_keys_and_audit_commands(minilm_kernel, tmp_path):
    from tests.e2e.test_training import sentiment_csv

    address = ["--address", minilm_kernel.address]
    data = sentiment_csv(tmp_path / "cli.csv", rows=100)
    assert "reviews" in llmos(*address, "datasets").stdout
    trained = json.loads(llmos(*address, "--json", "train", "minilm", "--path", str(data),
                               "--name", "cli-sent", "--epochs", "1", "--max-tokens", "32").stdout)
    assert trained["model"] == "cli-sent:1" and "test" in trained["metrics"]
    evaluated = json.loads(llmos(*address, "--json", "evaluate", "cli-sent", "--path",
                                 str(data)).stdout)
    assert evaluated["rows"] == 100 and evaluated["split"] == "all"  # the whole file
    assert len(evaluated["confusion"]) == 2
    home = tmp_path / "home"
    env = {"LLMOS_HOME": str(home)}
    assert "kernel key" in llmos("keys", "create", "--client", "carol", env=env).stdout
    llmos("keys", "allow", "carol", str(home / "keys" / "clients" / "carol.key"),
          "--caps", "infer", env=env)
    assert (home / "keys" / "allowed" / "carol.key").exists()
    bad = llmos("keys", "allow", "carol", str(home / "keys" / "clients" / "carol.key"),
                "--caps", "root", env=env, check=False)
    assert bad.returncode == 2 and "BAD_REQUEST" in bad.stderr
    assert json.loads(llmos("--json", "audit", env=env).stdout) == []
