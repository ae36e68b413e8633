"""The library core never imports the command-line layer, and the trainer classes read no environment variable."""
from __future__ import annotations

import ast
from pathlib import Path

import nnunet_lefusion
from nnunet_lefusion.nnunet import trainer

PACKAGE = Path(nnunet_lefusion.__file__).parent


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_no_import_from_the_core_up_to_cli():
    core = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 20
    upward = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith("nnunet_lefusion.cli"))
              for p in core}
    assert {k: v for k, v in upward.items() if v} == {}


def test_the_trainer_classes_read_no_environment_variable():
    tree = ast.parse(Path(trainer.__file__).read_text())
    reads = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")]
    assert reads == []
