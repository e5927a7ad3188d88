"""A third-party plugin, installed as a distribution with an ``llmos`` entry point, runs inside
a real kernel process and sees every finished job through ``llmos_job_finished``."""

import json
import textwrap

import pytest

from llmos import KernelError
from llmos.kernel.testing import running_kernel

PLUGIN = textwrap.dedent('''
    import json, os
    from llmos import hookimpl

    @hookimpl
    def llmos_job_finished(job):
        with open(os.environ["JOB_LOG"], "a") as log:
            log.write(json.dumps({"id": job.id, "syscall": job.syscall,
                                  "state": str(job.state)}) + "\\n")
''')


def test_job_finished_hook_runs_in_the_kernel(home, tmp_path, monkeypatch):
    (tmp_path / "llmos_joblog.py").write_text(PLUGIN)
    dist = tmp_path / "llmos_joblog-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmos-joblog\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmos]\njoblog = llmos_joblog\n")
    log = tmp_path / "jobs.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("JOB_LOG", str(log))
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        assert "joblog" in client.info()["plugins"]
        imported = client.import_model("minilm")
        with pytest.raises(KernelError):  # refused at admission: never a job, no hook call
            client.load("nope")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == [{"id": imported["job"], "syscall": "import", "state": "DONE"}]
