"""The house rules, read from the source: which room may import which, no import cycle, and line
budgets (400 per module, 60 per function). Pure `ast`: nothing is imported, so this runs in a
second and fails with the offending import, file or function named.

Rooms of `pipeline/` by rank: a module may import its own room and rooms of lower rank only.
The packages below `pipeline` keep their layering too: `ttt` imports none of the others,
`kb_index` only `ttt`, `workers` only `ttt` and `kb_index`; none of the three imports Ray
except `workers` (the actors).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "ttt", "kb_index")
LINE_BUDGET = 400
FUNCTION_BUDGET = 60  # lines of one function or method, its docstring included
# pipeline's rooms, lowest first; `foundation` is pipeline/config.py and pipeline/manifest.py
ROOM_RANK = {"foundation": 0, "embedded": 1, "job": 2, "benchmarks": 3, "analysis": 4, "campaigns": 5, "top": 6}
FOUNDATION = {"pipeline.config", "pipeline.manifest"}
TOP = {"pipeline", "pipeline.cli", "pipeline.harness", "pipeline.__main__"}
# what each lower package may import of the project (besides itself), and whether it may import Ray
LOWER = {"ttt": (set(), False), "kb_index": ({"ttt"}, False), "workers": ({"ttt", "kb_index"}, True)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules (and top-level third-party packages) a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline.embedded import text` imports the module pipeline.embedded.text
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(names)
    return found


def project_target(name: str, modules: set[str]) -> str | None:
    """The project module an imported name resolves to (the longest known prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def room(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module in TOP:
        return "top"
    return module.split(".")[1]


def graph() -> tuple[dict[str, Path], dict[str, set[str]], dict[str, set[str]]]:
    files = source_files()
    modules = set(files)
    edges, raw = {}, {}
    for mod, path in files.items():
        raw[mod] = imports_of(path, modules)
        edges[mod] = {t for n in raw[mod] if (t := project_target(n, modules)) and t != mod}
    return files, edges, raw


def test_every_pipeline_module_belongs_to_a_room():
    files, _, _ = graph()
    unknown = [m for m in files if m.startswith("pipeline") and room(m) not in ROOM_RANK]
    assert not unknown, f"modules outside any room (add them to a room or to FOUNDATION/TOP): {unknown}"


def door_violations(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, targets in edges.items():
        if not mod.startswith("pipeline"):
            continue
        for t in targets:
            if t.startswith("pipeline") and ROOM_RANK[room(t)] > ROOM_RANK[room(mod)]:
                wrong.append(f"{mod} ({room(mod)}) imports {t} ({room(t)})")
            if room(mod) == "foundation" and t.startswith("pipeline") and t not in FOUNDATION:
                wrong.append(f"{mod} (foundation) imports {t}")
    return sorted(wrong)


def upward_violations(edges: dict[str, set[str]], raw: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, targets in edges.items():
        pkg = mod.split(".")[0]
        if pkg not in LOWER:
            continue
        allowed, ray_ok = LOWER[pkg]
        wrong += [f"{mod} imports {t}" for t in targets if t.split(".")[0] not in allowed | {pkg}]
        if not ray_ok:
            wrong += [f"{mod} imports {n}" for n in raw[mod] if n.split(".")[0] == "ray"]
    return sorted(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for t in sorted(edges.get(mod, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state and (cycle := visit(mod)):
            return cycle
    return None


def test_doors_run_one_way():
    _, edges, _ = graph()
    wrong = door_violations(edges)
    assert not wrong, "imports against the doors:\n" + "\n".join(wrong)


def test_lower_packages_never_import_upward_nor_ray():
    _, edges, raw = graph()
    wrong = upward_violations(edges, raw)
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycle():
    _, edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_modules_fit_the_line_budget():
    files, _, _ = graph()
    long = {m: n for m, p in files.items() if (n := len(p.read_text().splitlines())) > LINE_BUDGET}
    assert not long, f"modules over {LINE_BUDGET} lines (split them along their concepts): {long}"


def long_functions(path: Path, budget: int = FUNCTION_BUDGET) -> dict[str, int]:
    """`name: lines` of every function or method in `path` longer than `budget`."""
    return {f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > budget}


def test_functions_fit_the_line_budget():
    files, _, _ = graph()
    long = {k: n for p in files.values() for k, n in long_functions(p).items()}
    assert not long, f"functions over {FUNCTION_BUDGET} lines (split where a name would explain a part): {long}"


def test_the_rules_catch_what_they_should(tmp_path):
    """The checks are not vacuous: on made-up imports, each rule finds its breach."""
    modules = {"pipeline.job.a", "pipeline.analysis.b", "pipeline.campaigns.c", "ttt.x", "workers.y"}
    source = tmp_path / "a.py"
    source.write_text("import ray\n\ndef f():\n    from pipeline.campaigns.c import thing\n")
    raw = {"pipeline.job.a": imports_of(source, modules), "ttt.x": {"ray", "workers.y"}}
    edges = {m: {t for n in r if (t := project_target(n, modules))} for m, r in raw.items()}
    assert edges["pipeline.job.a"] == {"pipeline.campaigns.c"}  # found inside a function too
    assert door_violations(edges) == ["pipeline.job.a (job) imports pipeline.campaigns.c (campaigns)"]
    assert upward_violations(edges, raw) == ["ttt.x imports ray", "ttt.x imports workers.y"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source.write_text("def f():\n" + "    x = 1\n" * 60 + "\n\ndef g():\n    return 1\n")
    assert long_functions(source) == {"a.py:f": 61}
