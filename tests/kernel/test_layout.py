"""The kernel keeps its shape: small classes, a loop that asks job kinds instead of
dispatching on syscall names (docs/architecture.md, "The house in three screens")."""

import ast
import re
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[2] / "kernel"
MAX_CLASS_LINES = 400


def test_no_kernel_class_is_over_400_lines():
    too_long = []
    for path in sorted(KERNEL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not too_long


def test_the_loop_never_dispatches_on_a_syscall_name():
    source = (KERNEL / "core.py").read_text()
    assert not re.findall(r"\.syscall\s*(==|!=)|\.syscall\s+(not\s+)?in\s*[({]", source)
    assert not re.findall(r"\.op\s*==\s*\"", source)  # host ops are TaskOp members
