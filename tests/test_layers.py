"""The layout is the architecture: imports only run downward, and no two modules import each other in a circle.

Every import in the project's source is read from the files themselves (ast, so an import inside a function counts
as much as one at the top), mapped to the package it names, and held to LAYERS. The source is found from the
repository's root, not from where the package happens to be installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folder each installed package comes from (pyproject.toml's package-dir).
FOLDERS = {
    "splitleak": ROOT / "splitleak",
    "splitleak.device": ROOT / "device",
    "splitleak.cloud": ROOT / "cloud",
    "splitleak.attacker": ROOT / "attacker",
    "splitleak.demo": ROOT / "demo",
    "splitleak.protos": ROOT / "protos",
}
# Lower layers never import higher ones; packages on the same layer never import each other.
LAYERS = {
    "splitleak.protos": 0,
    "splitleak.core": 0,
    "splitleak.model": 1,
    "splitleak.device": 1,
    "splitleak.cloud": 1,
    "splitleak.certs": 1,  # `splitleak tls make`: certificates, on the core alone
    "splitleak.attacker": 2,
    "splitleak.study": 3,
    "splitleak.demo": 3,
    "splitleak.cli": 4,
    "splitleak.run": 4,
    "splitleak.protogen": 4,
    "splitleak": 0,  # the package's own __init__: its version, and nothing imported
}
# Same layer, but allowed: the core's codec needs the wire format, and anything may ask the package its version.
ALLOWED = {("splitleak.core", "splitleak.protos"), ("splitleak.core", "splitleak"), ("splitleak.protos", "splitleak")}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "splitleak" and parts[0] in {"device", "cloud", "attacker", "demo", "protos"}:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """Every splitleak module `path` imports, wherever in the file the import statement stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; the project spells every import out"
            base = node.module or ""
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in out if name == "splitleak" or name.startswith("splitleak.")}


def package_of(module: str) -> str:
    """The layer a module belongs to: its longest prefix in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(module)


def graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (names that are attributes, not modules, dropped)."""
    found = modules()
    return {module: {name for name in imports(module, path) if name in found} for module, path in found.items()}


def test_the_source_tree_is_what_the_layers_name():
    packages = {package_of(m) for m in modules()}
    assert packages == set(LAYERS), f"a package without a layer, or a layer without a package: {packages ^ set(LAYERS)}"


def test_imports_only_run_downward():
    upward = []
    for module, targets in graph().items():
        mine = package_of(module)
        for target in targets:
            theirs = package_of(target)
            if theirs == mine or (mine, theirs) in ALLOWED:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} imports {target} ({mine} is layer {LAYERS[mine]}, {theirs} {LAYERS[theirs]})")
    assert not upward, "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle():
    # A package's __init__ importing its own modules is how a registry is filled, not a circle of design.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# A data set named `torchvision:NAME` is loaded through torchvision, on the machine that names it (a laptop, the study);
# the device imports it only when told to stream such a set, never on the shipped path.
EXCEPTIONS = {"splitleak.core.data": {"torchvision"}}


@pytest.mark.parametrize("role", ["splitleak.device", "splitleak.core"])
def test_the_phone_side_never_imports_torch_or_the_torch_side(role):
    # Statically, anywhere in the files, so that a rarely taken branch cannot pull torch onto a phone.
    found = modules()
    heavy = {"torch", "torchvision", "onnx2torch", "splitleak.model"}
    for module, path in found.items():
        if package_of(module) != role:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        offending = {n for n in names if any(n == h or n.startswith(h + ".") for h in heavy)}
        assert offending <= EXCEPTIONS.get(module, set()), f"{module} imports {offending}"
