"""The package's layout, as docs/architecture.md describes it: layers that import only downwards,
no import cycles (imports inside functions counted), nothing below `cli/` importing `cli/`, and a
package that reads nothing of the repository by path."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "throttle"

# Each layer may import itself and the layers listed after it, nothing else of throttle.
LAYERS = {
    "cli": {"cli", "censor", "measure", "lab", "kernel", "engine", "scenario", "wire", "base"},
    "censor": {"censor", "measure", "kernel", "engine", "scenario", "wire", "base"},
    "measure": {"measure", "lab", "kernel", "engine", "scenario", "wire", "base"},
    "lab": {"lab", "kernel", "scenario", "wire", "base"},
    "kernel": {"kernel", "engine", "wire", "base"},
    "engine": {"engine", "scenario", "wire", "base"},
    "scenario": {"scenario", "wire", "base"},
    "wire": {"wire", "base"},
    "base": {"base"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every throttle module `path` imports, anywhere in the file (functions included), with the
    packages whose __init__ such an import runs first."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("throttle"):
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless we are inside them.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:i])
                if ancestor in known and not (name == ancestor or name.startswith(ancestor + ".")):
                    found.add(ancestor)
            found.add(target)
    found.discard(name)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "throttle.__main__":
        return "cli"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "base"  # throttle, throttle.errors, .units, .files, .children, .scenarios (data)


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def test_the_package_has_its_subpackages() -> None:
    for sub in ("wire", "engine", "scenario", "kernel", "lab", "measure", "cli"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    assert not (PACKAGE / "scenarios").exists(), "the bundled scenarios live in the top-level scenarios/ folder"


def test_every_subpackage_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk | {"throttle.scenarios"} == listed


def test_layers_import_only_downwards() -> None:
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})"
             for m, targets in graph().items() for t in targets if layer(t) not in LAYERS[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports_and_parent_packages() -> None:
    """The checks above read real edges (so they can fail): from-imports, and parent packages."""
    g = graph()
    assert "throttle.cli.app" in g["throttle.cli"]
    assert "throttle.wire.ip" in g["throttle.engine.core"]
    assert layer("throttle.cli.app") == "cli" and layer("throttle.units") == "base"


def test_nothing_in_the_package_reads_the_repository_by_path() -> None:
    # Path(__file__) climbing out of the package, or a path naming tests/ or ../
    pattern = re.compile(r"""__file__\).*\.parent|["']\.\./|["']tests["'/]""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "PYTHONPATH" not in line and "package_root" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_command_line_starts_without_heavy_libraries() -> None:
    """`classify`, `scenarios` and `demo --offline` need none of these: each is imported by the
    function that uses it."""
    heavy = ("matplotlib", "prometheus_client", "netfilterqueue", "pyroute2", "cryptography", "scapy", "aioquic")
    code = f"import sys, throttle.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
