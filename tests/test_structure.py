"""The shape of src/peftkit, read statically with `ast` (nothing is imported): no import cycle between
modules, no module reaching into another module's private (underscore) names, files short enough to read
in one sitting and functions short enough to follow. Each failure lists every offender."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "peftkit"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for name, path in MODULES.items()}


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module named by `from <node.module> import ...` inside `module` (relative levels resolved)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every static import in `module`, function-local ones
    included; only imports of this package are kept. `from pkg import sub` counts as importing pkg.sub when
    that is a module, and as importing pkg (its __init__) otherwise."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, node)
            if not target or not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append((target, plain, node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    """module -> the modules of this package it imports (a package counts as its __init__)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, but those are the parents' own business;
            # the edge is to the module named (a dotted name that is not a module falls back to its package)
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one concrete cycle, every module in its strongly connected component) for each component of more than one
    module: breaking that cycle may leave others among the same modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # Tarjan's algorithm; the graph has ~100 nodes, recursion is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(_one_cycle(graph, comp), comp) for comp in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of `component`, as [m0, m1, ..., m0] (breadth-first search)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_import_graph_has_no_cycle():
    cycles = _cycles(_edges())
    lines = [" -> ".join(cycle) + (f"   (modules tangled together: {', '.join(comp)})" if len(comp) + 1 > len(cycle)
                                   else "") for cycle, comp in cycles]
    assert not cycles, (
        f"{len(cycles)} import cycle(s) in src/{PACKAGE} (static imports, function-local ones included; a package "
        "counts as its __init__). Break each by moving the shared piece down to a module both can import, or by "
        "dispatching through a registry:\n" + "\n".join(lines)
    )


def _private_imports() -> list[str]:
    offenders = []
    for module in MODULES:
        path = _rel(MODULES[module])
        for target, names, line in _imports(module):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    offenders.append(f"{path}:{line}: from {target} import {name}")
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                offenders.append(f"{path}:{line}: imports the private module {target}")
        offenders.extend(_private_attribute_uses(module))
    return offenders


def _private_attribute_uses(module: str) -> list[str]:
    """`alias._name` where `alias` is bound by `import peftkit.x as alias` / `from peftkit import x` to a module
    of this package other than `module` itself."""
    aliases: dict[str, str] = {}
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
                elif not alias.asname and alias.name == PACKAGE:
                    aliases[PACKAGE] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    aliases[alias.asname or alias.name] = sub
    offenders = []
    for node in ast.walk(TREES[module]):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != module):
            offenders.append(f"{_rel(MODULES[module])}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return sorted(set(offenders))


def test_no_module_uses_another_modules_private_names():
    offenders = _private_imports()
    assert not offenders, (
        f"{len(offenders)} use(s) of another module's underscore names; make the name public (and part of "
        "that module's interface) or move the code that needs it:\n" + "\n".join(offenders)
    )


def test_no_file_over_the_line_limit():
    offenders = []
    for path in MODULES.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            offenders.append(f"{_rel(path)}: {n} lines")
    assert not offenders, (
        f"{len(offenders)} file(s) over {MAX_FILE_LINES} lines; split each by concept:\n" + "\n".join(offenders)
    )


def test_no_function_over_the_line_limit():
    offenders = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES:
                    offenders.append(f"{_rel(MODULES[module])}:{node.lineno}: {node.name} ({n} lines)")
    assert not offenders, (
        f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines (decorators and docstring included); "
        "split each into named steps:\n" + "\n".join(sorted(offenders))
    )


def test_the_checks_see_the_package():
    """Guard against the checks above passing vacuously (a wrong path finds no files, or no edges)."""
    assert f"{PACKAGE}.inject" in MODULES and len(MODULES) > 10, sorted(MODULES)
    assert sum(len(targets) for targets in _edges().values()) > 10


# --- dependencies: the declared ranges are the tested ones ------------------------------------------------------
ROOT = SRC.parent


def _pins(name: str) -> dict[str, str]:
    """name (normalized) -> version from a pip constraints file (comments and blank lines skipped)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, version = line.split("==")
            pins[canonicalize_name(pkg)] = version.split("+")[0]  # torch's local "+cpu" is not part of the pin
    return pins


def test_declared_ranges_are_the_tested_ones():
    """Every dependency in pyproject.toml is pinned in constraints.txt (what CI installs), inside its range, and its
    lower bound is tested: the pin in constraints-lowest.txt (CI's second run) where there is one, else at least
    the tested release's major.minor (patch releases inherit)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    tested, lowest = _pins("constraints.txt"), _pins("constraints-lowest.txt")
    problems = []
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if name not in tested:
            problems.append(f"{text}: not pinned in constraints.txt")
            continue
        if not req.specifier.contains(tested[name]):
            problems.append(f"{text}: the tested {tested[name]} (constraints.txt) is outside the range")
        if not lows:
            problems.append(f"{text}: no lower bound")
        elif name in lowest:
            low = Version(lowest[name])
            if low not in req.specifier or lows[0].release != low.release[: len(lows[0].release)]:
                problems.append(f"{text}: the lower bound is not the tested lowest {low} (constraints-lowest.txt)")
        elif lows[0].release[:2] < Version(tested[name]).release[:2]:
            problems.append(f"{text}: lower bound below the only tested release {tested[name]} (constraints.txt)")
    assert not problems, "dependency ranges that are not the tested ones:\n" + "\n".join(problems)
