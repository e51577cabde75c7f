"""The algorithm core imports no trainer, CLI or evaluation code (STYLE.md: pure, separately tested modules)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "seqcpo"
CORE = ["types.py", "losses.py", "logps.py", "reference.py", "io.py", *[f"negatives/{p.name}" for p in (PKG / "negatives").glob("*.py")]]
FORBIDDEN = ("seqcpo.training", "seqcpo.cli", "seqcpo.evaluation", "seqcpo.reproduce", "seqcpo.demo", "transformers.Trainer")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_core_imports_nothing_above_it():
    assert len(CORE) > 8
    for rel in CORE:
        for name in _imports(PKG / rel):
            assert not name.startswith(FORBIDDEN), f"seqcpo/{rel} imports {name}"
