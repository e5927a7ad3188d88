"""The project keeps its promises about itself: docs match code, no pickle, installable."""

import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from llmos.contract import hookspecs
from llmos.contract.syscalls import SYSCALLS
from llmos.kernel import core as core_module
from llmos.kernel.kinds import JobKind
from llmos.shell import hookspecs as shell_hookspecs

ROOT = Path(__file__).resolve().parent.parent
IO_THREAD_SYSCALLS = {"ping", "info"}


def test_every_syscall_is_documented():
    text = (ROOT / "docs" / "protocol.md").read_text()
    missing = [name for name in SYSCALLS if f"### `{name}`" not in text]
    assert not missing, f"docs/protocol.md lacks sections for {missing}"


def test_every_hook_is_documented():
    """The contract's hooks and the shell's (its own spec module)."""
    text = (ROOT / "docs" / "hooks.md").read_text()
    for module in (hookspecs, shell_hookspecs):
        hooks = [n for n, f in inspect.getmembers(module, inspect.isfunction) if n.startswith("llmos_")]
        assert hooks, module.__name__
        missing = [name for name in hooks if f"## `{name}`" not in text]
        assert not missing, f"docs/hooks.md lacks sections for {missing}"


def test_hooks_declared_outside_the_contract_are_named_in_the_hooks_entry_points():
    """The kernel accepts implementations of the shell's hook only because pyproject.toml
    names it in the ``llmos.hooks`` group."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    hooks = {n: shell_hookspecs.__name__ for n, f in inspect.getmembers(shell_hookspecs, inspect.isfunction)
             if n.startswith("llmos_")}
    assert declared["llmos.hooks"] == hooks


def test_every_syscall_has_exactly_one_handler():
    kinds = [cls for cls in vars(core_module).values()
             if isinstance(cls, type) and issubclass(cls, JobKind) and cls is not JobKind]
    names = [name for cls in kinds for name in cls.handlers(object.__new__(cls))]
    assert len(names) == len(set(names)), "a syscall has two handlers"
    assert set(names) | IO_THREAD_SYSCALLS == set(SYSCALLS)
    assert not set(names) & IO_THREAD_SYSCALLS


FORBIDDEN = re.compile(r"(import pickle|from pickle|pickle\.loads?\(|recv_pyobj|send_pyobj|"
                       r"marshal\.loads|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                       r"trust_remote_code\s*=\s*True|torch\.load\()")


def test_no_pickle_eval_or_remote_code_anywhere():
    offenders = []
    for folder in ("kernel", "drivers", "plugins", "shell", "llmos", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if FORBIDDEN.search(code) and "FORBIDDEN" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_torch_is_pinned_to_the_cpu_wheel():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]


def test_package_imports_from_any_folder(tmp_path):
    code = ("import llmos, llmos.kernel, llmos.drivers, llmos.plugins, llmos.shell; "
            "print(llmos.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == __import__("llmos").__version__


def test_the_kernel_process_does_not_import_heavy_frameworks(tmp_path):
    code = ("import sys; from llmos.kernel.server import KernelServer; "
            "from llmos.kernel.plugins import get_plugin_manager, collect; collect(get_plugin_manager()); "
            "heavy = ('torch', 'transformers', 'onnxruntime', 'openvino'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_wheel_contains_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    import zipfile

    (wheel,) = tmp_path.glob("llmos-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("llmos/__init__.py", "llmos/kernel/core.py", "llmos/kernel/scheduler/fifo.py",
                   "llmos/drivers/pytorch.py", "llmos/shell/cli.py", "llmos/plugins/__init__.py"):
        assert module in names, module
