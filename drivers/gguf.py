"""Convert a GGUF checkpoint into a plain Hugging Face folder (safetensors, fp32).

transformers dequantizes GGUF weights on load (with the ``gguf`` package), but the loaded
model keeps its ``hf_quantizer`` and ``quantization_config`` and refuses to be saved or
trained until both are removed. After conversion the folder loads like any other model
(about 2 s instead of about 17 s) and no GGUF code runs again.

Run by the kernel in a subprocess (the kernel process never imports a framework)::

    python -m llmos.drivers.gguf FILE.gguf OUT_DIR

Exit status 0 and one JSON line on stdout on success; 2 with the reason on stderr for a
bad input file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def convert(gguf_file: Path, out: Path) -> dict[str, object]:
    """Write ``out`` (config, generation config, safetensors weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"gguf_file": gguf_file.name, "local_files_only": True, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **common)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32,
                                                 **common)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmos.drivers.gguf")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"no such GGUF file: {args.gguf}", file=sys.stderr)
        return 2
    print(json.dumps(convert(args.gguf, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
