"""The scripts in tools/ import what exists: every ``jaxlora`` import in them, the ones inside
functions too (most import lazily, after parsing their arguments), names a module and an
attribute the package has. A tool run by hand only is otherwise broken silently by a move."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))


def _jaxlora_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every import of jaxlora in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "jaxlora":
                out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "jaxlora"
            ]
    return out


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_every_jaxlora_import_in_a_tool_resolves(path):
    missing = []
    for line, module, name in _jaxlora_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{path.name}:{line}: {module} ({e})")
            continue
        if name is not None and not hasattr(mod, name):
            try:  # `from package import submodule`
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_reads_imports_inside_functions(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def main():\n    from jaxlora.host import tune_allocator\n")
    assert _jaxlora_imports(bad) == [(2, "jaxlora.host", "tune_allocator")]
    with pytest.raises(AssertionError, match="bad.py:2: jaxlora.host"):
        test_every_jaxlora_import_in_a_tool_resolves(bad)
