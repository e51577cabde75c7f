"""No two seqcpo modules import each other, directly or around a loop (STYLE.md: two modules that import
each other share a third). Imports inside functions count: a deferred import is still a cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "seqcpo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        # a package's __init__ re-exporting its submodules is not a cycle with them
        graph[name] = {d for d in deps if not name.startswith(d + ".") and not d.startswith(name + ".")}
    return graph


def _cycle_through(graph, start):
    """A path start -> ... -> start, or None (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_graph_sees_the_layout_modules():
    graph = _graph()
    assert "seqcpo.two_pass" in graph["seqcpo.logps"]  # the dispatcher imports the layouts it runs
    assert "seqcpo.token_logps" in graph["seqcpo.two_pass"]


def test_no_import_cycle_in_the_package():
    graph = _graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_through(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
