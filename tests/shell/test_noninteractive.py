"""``llmos shell -c`` and ``llmos shell SCRIPT`` against real kernels: status, one-line
errors, --json."""

import json
import subprocess
import sys

import pytest

from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import build_tiny_classifier
from tests.shell.conftest import run_shell as shell


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_c_runs_commands_and_exits_zero(minilm_kernel):
    result = shell(minilm_kernel, "-c", "ping; models\nembed minilm 'A man plays guitar.'")
    assert result.returncode == 0, result.stderr
    assert "pong" in result.stdout and "minilm" in result.stdout
    assert "[0] dim 384:" in result.stdout


def test_json_output_parses(minilm_kernel):
    result = shell(minilm_kernel, "--json", "-c", "embed minilm 'great film' 'dull'")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["task"] == "embed" and len(data["embeddings"]) == 2
    assert len(data["embeddings"][0]) == 384
    models = json.loads(shell(minilm_kernel, "-c", "models", "--json").stdout)
    assert any(m["model"] == "minilm" and m["loaded_on"] for m in models)
    jobs = json.loads(shell(minilm_kernel, "--json", "-c", "ps --all").stdout)
    assert any(j["syscall"] == "infer" and j["state"] == "DONE" for j in jobs)


def test_a_file_longer_than_one_job_is_embedded_in_batches_in_order(minilm_kernel, tmp_path):
    lines = [f"review number {i}: {'great' if i % 2 else 'dull'} film" for i in range(600)]
    (tmp_path / "big.txt").write_text("\n".join(lines))
    result = shell(minilm_kernel, "--json", "-c", f"embed minilm --file {tmp_path / 'big.txt'}")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["embeddings"]) == 600 and len(data["jobs"]) == 3  # 256 + 256 + 88
    single = json.loads(shell(minilm_kernel, "--json", "-c",
                              f"embed minilm {json.dumps(lines[599])}").stdout)
    assert data["embeddings"][599] == pytest.approx(single["embeddings"][0], abs=1e-4)


def test_a_kernel_error_is_one_line_with_the_code_and_a_nonzero_status(minilm_kernel):
    result = shell(minilm_kernel, "-c", "classify minilm 'great film'; ping")
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith("error BAD_REQUEST: ") and "classification head" in line
    assert "pong" not in result.stdout


def test_a_shell_error_is_one_line_too(minilm_kernel):
    unknown = shell(minilm_kernel, "-c", "frobnicate")
    assert unknown.returncode == 2
    assert one_error_line(unknown) == "error NOT_FOUND: unknown command 'frobnicate' (type help for the list)"
    usage = shell(minilm_kernel, "-c", "nice 12")
    assert usage.returncode == 2 and one_error_line(usage) == (
        "error BAD_REQUEST: nice: missing NICE; usage: nice ID NICE")


def test_a_script_stops_at_its_first_error(minilm_kernel, tmp_path):
    script = tmp_path / "work.llmos"
    script.write_text("# embed, then a typo\nping\nembed minilm hello\n\n"
                      "embed no-such-model hello\nping\n")
    result = shell(minilm_kernel, str(script))
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error NOT_FOUND: {script}:5: ") and "no-such-model" in line
    assert result.stdout.count("pong") == 1 and "[0] dim 384" in result.stdout


def test_a_script_that_works_exits_zero_and_quit_ends_it(minilm_kernel, tmp_path):
    script = tmp_path / "ok.llmos"
    script.write_text("ping\nquit\nfrobnicate\n")
    result = shell(minilm_kernel, str(script))
    assert result.returncode == 0 and result.stderr == "" and "pong" in result.stdout


def test_commands_come_from_stdin_when_it_is_not_a_terminal(minilm_kernel):
    result = shell(minilm_kernel, stdin="ping\nplugins\n")
    assert result.returncode == 0, result.stderr
    assert "pong" in result.stdout and "llmos.plugins.compression" in result.stdout


def test_a_missing_script_or_kernel_is_one_line(minilm_kernel, home):
    missing = shell(minilm_kernel, str(home / "nope.llmos"))
    assert missing.returncode == 2 and "cannot read" in one_error_line(missing)
    result = subprocess.run([sys.executable, "-m", "llmos.shell", "--home", str(home), "shell",
                             "-c", "ping"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert one_error_line(result).startswith("error TIMEOUT: no kernel answers at ipc://")


def test_the_issue_example_classifies(shell_kernel, tmp_path):
    """``llmos shell -c "classify reviews 'great film'"``, with a (tiny, random) classifier
    imported and loaded as ``reviews`` by a script."""
    folder = build_tiny_classifier(tmp_path / "tiny", _minilm_path())
    setup = tmp_path / "setup.llmos"
    setup.write_text(f"import --path {folder} --name reviews\nload reviews --device torch:cpu\n")
    assert shell(shell_kernel, str(setup)).returncode == 0
    result = shell(shell_kernel, "-c", "classify reviews 'great film'")
    assert result.returncode == 0, result.stderr
    assert "great film" in result.stdout and "predictions" in result.stdout
    data = json.loads(shell(shell_kernel, "--json", "-c", "classify reviews 'great film'").stdout)
    assert data["predictions"][0]["label"] in ("negative", "positive")
