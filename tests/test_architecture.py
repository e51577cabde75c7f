"""Import rules (README, "Development"): the algorithm core imports no trainer, CLI or evaluation code; evaluation imports no
training code; the grid reaches training only through its entry points (run, config, separation), never the trainer;
no two seqcpo modules import each other, directly or around a loop; the grid's modules stay small.

The core is every module of the package that is not an upper floor, so a new module is checked without being
listed here; ``EXPECTED_CORE`` names the ones that must be found (a renamed or lost module fails the test).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "seqcpo"
# the upper floors: the trainer, the CLIs, evaluation, the demo/grid scripts, and data loading (it may hook into the
# Trainer's callbacks); everything else is held to the rule
UPPER = ("training/", "evaluation/", "data/", "grid/", "cli.py", "demo.py", "__init__.py")
EXPECTED_CORE = {"types.py", "losses.py", "logps.py", "two_pass.py", "reference.py", "io.py", "pss.py", "padding.py",
                 "sampling.py", "seeding.py", "batching.py", "decoding.py", "hf_model.py", "token_logps.py",
                 "prefix_shared.py", "packing.py", "document_rows.py", "negatives/base.py", "negatives/mean_field.py", "negatives/autoregressive.py",
                 "negatives/batch.py", "negatives/truncation.py", "negatives/mixture.py", "negatives/registry.py",
                 "config_loader/__init__.py", "config_loader/yaml_io.py", "config_loader/values.py",
                 "config_loader/flags.py",
                 "models/__init__.py", "models/loading.py", "models/files.py", "models/gguf.py", "models/pickled.py",
                 "models/tokenizers.py", "models/digest.py", "negatives/data.py"}
FORBIDDEN = ("seqcpo.training", "seqcpo.cli", "seqcpo.evaluation", "seqcpo.grid", "seqcpo.demo", "transformers.Trainer")
TRAINING = ("seqcpo.training", "seqcpo.losses", "seqcpo.negatives", "seqcpo.grid", "seqcpo.trainer")
# what seqcpo/grid/ may import of the training package (its entry points); the trainer, the CLI and the demo never
GRID_TRAINING_ENTRIES = ("seqcpo.training.run", "seqcpo.training.config", "seqcpo.training.separation")
GRID_FORBIDDEN = ("seqcpo.cli", "seqcpo.demo", "transformers.Trainer", "transformers.trainer")
GRID_MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 80
# cycles allowed for now: none
PENDING_CYCLES: set[frozenset] = set()


def _imports(path: Path):
    """Every module named by an absolute import anywhere in the file (function-level imports count)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _core() -> list[str]:
    files = sorted(_rel(p) for p in PKG.rglob("*.py"))
    return [f for f in files if not f.startswith(UPPER)]


def _module(rel: str) -> str:
    parts = ["seqcpo", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """seqcpo module -> the seqcpo modules it imports (a package's __init__ and its own submodules excluded)."""
    modules = {_module(_rel(p)): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {t for t in _imports(path) if t in modules and t != name}
        graph[name] = {d for d in deps if not name.startswith(d + ".") and not d.startswith(name + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_core_covers_every_algorithm_module():
    core = set(_core())
    assert EXPECTED_CORE <= core, f"core modules not found: {sorted(EXPECTED_CORE - core)}"


def test_core_imports_nothing_above_it():
    for rel in _core():
        for name in _imports(PKG / rel):
            assert not name.startswith(FORBIDDEN), f"seqcpo/{rel} imports {name}"


def test_evaluation_imports_no_training_code():
    for path in (PKG / "evaluation").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith(TRAINING), f"seqcpo/{_rel(path)} imports {name}"


def test_cycle_finder_sees_a_cycle():
    """The check below can fail: a two-module loop and a three-module loop are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_seqcpo_modules():
    graph = _graph()
    assert "seqcpo.sampling" in graph["seqcpo.pss"]  # the graph sees the imports it checks
    assert "seqcpo.evaluation.checkpoints" in graph["seqcpo.evaluation.generate"]
    cycles = [c for c in _cycles(graph) if frozenset(c) not in PENDING_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# The negatives sit on a low floor: besides each other they import only these leaf modules, which import no
# seqcpo module themselves (no log-prob layout, reference, loss or trainer code under a generator).
NEGATIVES_FLOOR = {"seqcpo.types", "seqcpo.seeding", "seqcpo.padding", "seqcpo.sampling", "seqcpo.decoding",
                   "seqcpo.hf_model", "seqcpo.config_loader"}
# the trainer's parts: the trainer composes them, so none imports it, the CLI, the run driver or evaluation
TRAINER_PARTS = ("training/scoring.py", "training/step_metrics.py", "training/policy_layout.py", "training/pss_step.py",
                 "training/negatives_model.py", "training/records.py")
ABOVE_TRAINER_PARTS = ("seqcpo.training.trainer", "seqcpo.training.run", "seqcpo.cli", "seqcpo.evaluation",
                       "seqcpo.grid", "transformers.Trainer")


def _floor_breaches(graph: dict[str, set[str]], package: str, floor: set[str]) -> list[tuple[str, str]]:
    """(module, import) pairs where a module of ``package`` imports a seqcpo module outside the package and
    ``floor``, or a floor module imports any seqcpo module outside the floor."""
    inside = lambda m: m == package or m.startswith(package + ".")  # noqa: E731
    out = [(m, d) for m, deps in graph.items() if inside(m) for d in deps if not inside(d) and d not in floor]
    out += [(m, d) for m in floor for d in graph.get(m, ()) if d not in floor]
    return sorted(out)


def test_floor_finder_sees_a_breach():
    graph = {"p.a": {"p.b", "low"}, "p.b": {"high"}, "low": set(), "high": {"p.a"}, "low2": {"high"}}
    assert _floor_breaches(graph, "p", {"low"}) == [("p.b", "high")]
    assert _floor_breaches(graph, "p", {"low", "low2"}) == [("low2", "high"), ("p.b", "high")]
    assert _floor_breaches({"p.a": {"low"}, "low": set()}, "p", {"low"}) == []


def test_negatives_import_only_their_floor():
    graph = _graph()
    assert "seqcpo.hf_model" in graph["seqcpo.negatives.autoregressive"]  # the KV-cache helpers come from there
    breaches = _floor_breaches(graph, "seqcpo.negatives", NEGATIVES_FLOOR)
    assert not breaches, "negatives above their floor: " + "; ".join(f"{m} imports {d}" for m, d in breaches)


def test_trainer_parts_import_nothing_above_them():
    for rel in TRAINER_PARTS:
        assert (PKG / rel).is_file(), f"seqcpo/{rel} not found"
        for name in _imports(PKG / rel):
            assert not name.startswith(ABOVE_TRAINER_PARTS), f"seqcpo/{rel} imports {name}"


def _grid_violations(imports: dict[str, list[str]]) -> list[str]:
    """``"file imports name"`` for each import of a grid module (``{file: names}``) that breaks the grid's rule."""
    out = []
    for rel, names in imports.items():
        for name in names:
            training = name.startswith("seqcpo.training.") and not name.startswith(GRID_TRAINING_ENTRIES)
            if training or name.startswith(GRID_FORBIDDEN):
                out.append(f"seqcpo/{rel} imports {name}")
    return out


def _long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"name (N lines)"`` for each function (or method) of ``source`` longer than ``limit`` lines."""
    nodes = (n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in nodes if n.end_lineno - n.lineno + 1 > limit]


def test_grid_rule_and_size_checks_can_fail():
    bad = {"grid/x.py": ["seqcpo.training.trainer", "seqcpo.training.run", "seqcpo.training", "seqcpo.cli"]}
    assert _grid_violations(bad) == ["seqcpo/grid/x.py imports seqcpo.training.trainer",
                                     "seqcpo/grid/x.py imports seqcpo.cli"]
    long_source = "def f():\n" + "    x = 1\n" * 80 + "def g():\n    pass\n"
    assert _long_functions(long_source) == ["f (81 lines)"]


def test_grid_reaches_training_only_through_its_entry_points():
    files = sorted((PKG / "grid").glob("*.py"))
    assert {"spec.py", "cache.py", "run.py", "train.py"} <= {p.name for p in files}  # the rule sees the package
    imports = {_rel(p): list(_imports(p)) for p in files}
    assert "seqcpo.training.run" in imports["grid/train.py"]  # and the imports it checks
    assert not _grid_violations(imports)


def test_grid_modules_and_functions_stay_small():
    for path in sorted((PKG / "grid").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= GRID_MAX_MODULE_LINES, f"seqcpo/{_rel(path)}: over {GRID_MAX_MODULE_LINES} lines"
        assert not _long_functions(text), f"seqcpo/{_rel(path)}: {_long_functions(text)}"
