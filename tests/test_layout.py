"""The package's layout, as docs/architecture.md describes it: layers that import only downwards,
no import cycles (imports inside functions counted), nothing below `cli/` importing `cli/`, a
package that reads nothing of the repository by path, modules of at most 600 lines, and the rules
a reading of the code can check: tools found only through kernel/tools.py, child processes only
through children.py, `print` only in cli/, IP headers read only in wire/."""

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
    "cli": {"cli", "censor", "infer", "measure", "lab", "kernel", "engine", "scenario", "wire", "base"},
    "infer": {"infer", "measure", "lab", "kernel", "engine", "scenario", "wire", "base"},
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
    for sub in ("wire", "engine", "scenario", "kernel", "lab", "measure", "infer", "cli"):
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
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_module_is_over_600_lines() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_command_line_starts_without_heavy_libraries() -> None:
    """`classify`, `scenarios` and `demo --offline` need none of these: each is imported by the
    function that uses it."""
    heavy = ("matplotlib", "prometheus_client", "netfilterqueue", "pyroute2", "cryptography", "scapy", "aioquic")
    code = f"import sys, throttle.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the rules of docs/architecture.md that a reading of the code can check ---------------------------

# Every system tool throttle runs, or might (the names a bare argv would start with).
TOOLS = {"ip", "ss", "tc", "curl", "tcpdump", "iptables", "ip6tables", "iptables-save", "ip6tables-save",
         "iptables-restore", "ethtool", "dnsmasq", "modprobe", "sysctl", "sh", "bash", "chromium", "clang", "gcc",
         "iperf3", "openssl", "bpftool", "ping", "nginx", "tshark", "promtool", "mount", "umount", "kill", "nft"}


def bare_tools(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, tool) of argv lists that start with a tool's bare name, and of calls to shutil.which:
    a tool must be found through throttle.kernel.tools (its sbin fallback, its message naming the
    package). A tuple, or a list of tool names only, is a set of names, not a command line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and node.elts:
            first = node.elts[0]
            only_names = all(isinstance(e, ast.Constant) and e.value in TOOLS for e in node.elts)
            if isinstance(first, ast.Constant) and first.value in TOOLS and not only_names:
                found.append((node.lineno, first.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "which":
            found.append((node.lineno, "shutil.which"))
    return sorted(found)


def prints(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]


PACKET_NAMES = {"packet", "pkt", "frame", "ip_packet", "segment", "datagram_bytes"}


def header_reads(tree: ast.AST) -> list[int]:
    """Lines that read a packet's bytes at a fixed offset (`packet[9]`, `packet[l4 + 13]`,
    `int.from_bytes(packet[4:8], ...)`): header decoding, which only throttle/wire/ may do. Cutting
    a packet at offsets that wire/ gave (`packet[l4 + data_off : end]`) is not decoding."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in PACKET_NAMES:
            if any(isinstance(n, ast.Constant) and isinstance(n.value, int) for n in ast.walk(node.slice)):
                lines.append(node.lineno)
    return lines


def offenders(check: str) -> list[str]:
    """Every place in throttle/ that breaks one of the rules, outside the module that owns it."""
    owner = {"tools": ("kernel/tools.py",), "print": ("cli/",), "headers": ("wire/",)}[check]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith(owner):
            continue
        tree = ast.parse(path.read_text())
        if check == "tools":
            found += [f"throttle/{rel}:{line}: {tool}" for line, tool in bare_tools(tree)]
        elif check == "print":
            found += [f"throttle/{rel}:{line}" for line in prints(tree)]
        else:
            found += [f"throttle/{rel}:{line}" for line in header_reads(tree)]
    return found


def test_tools_are_found_only_through_kernel_tools() -> None:
    assert not offenders("tools"), "\n".join(offenders("tools"))


def test_only_the_command_line_prints() -> None:
    assert not offenders("print"), "\n".join(offenders("print"))


def test_ip_headers_are_read_only_in_wire() -> None:
    assert not offenders("headers"), "\n".join(offenders("headers"))


def test_child_processes_start_only_through_children() -> None:
    users = [module_name(p) for p in PACKAGE.rglob("*.py")
             if p != PACKAGE / "children.py" and any(
                 isinstance(n, (ast.Import, ast.ImportFrom)) and "subprocess" in
                 ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
                 for n in ast.walk(ast.parse(p.read_text())))]
    assert not users, users


def test_the_rule_checks_see_what_they_look_for() -> None:
    """Each check finds a planted offence (so a pass above means something), and lets the
    allowed forms through."""
    bad = ast.parse('subprocess.run(["ip", "netns", "exec", ns, "curl", url])\n'
                    'shutil.which("tc")\n'
                    'print("hello")\n'
                    'flags = packet[l4 + 13]\n'
                    'seq = int.from_bytes(packet[l4 + 4 : l4 + 8], "big")\n')
    assert bare_tools(bad) == [(1, "ip"), (2, "shutil.which")]
    assert prints(bad) == [3]
    assert header_reads(bad) == [4, 5]
    good = ast.parse('argv = [require_tool("ip", "iproute2"), "netns", "exec", ns]\n'
                     'payload = packet[l4 + data_off : end]\n'
                     'names = ("iptables", "ip6tables")\n'
                     'tools = ["iptables", "ip6tables"]\n'
                     'log.write("x")\n')
    assert not bare_tools(good) and not prints(good) and not header_reads(good)
