"""No import cycles among fsdp_kd's modules. Every import counts, at the top of a module, inside a function or under
TYPE_CHECKING: each is a dependency a reader has to follow, and moving one into a function only hides it."""

import ast
from pathlib import Path

from conftest import REPO


def module_imports(package_dir: Path) -> dict[str, set[str]]:
    """{module: the modules of the package it imports}, each named by its dotted path from the package's name."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        name = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def within(target: str) -> str | None:
        """The package's module that an imported name lives in (a name imported from a module is in that module)."""
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {within(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                imported |= {within(f"{base}.{alias.name}") for alias in node.names}
        edges[name] = imported - {None, name}
    return edges


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


def described(cycles: list[list[str]], edges: dict[str, set[str]]) -> str:
    return "\n".join(f"import cycle among {', '.join(c)}: "
                     + "; ".join(f"{a} -> {b}" for a in c for b in sorted(edges[a]) if b in c) for c in cycles)


def test_fsdp_kd_has_no_import_cycles():
    edges = module_imports(REPO / "fsdp_kd")
    assert len(edges) > 20 and "fsdp_kd.loss" in edges["fsdp_kd.trainer"]  # the package was read
    cycles = import_cycles(edges)
    assert not cycles, described(cycles, edges)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_the_check_finds_a_cycle_whatever_form_its_imports_take(tmp_path):
    """pkg.a -> pkg.b at the top, pkg.b -> pkg.c inside a function, pkg.c -> pkg.a absolute under TYPE_CHECKING:
    one cycle of three; pkg.d and pkg.sub.e import into it (one relative level up) without being part of it."""
    package = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .c import C\n    return C\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nclass C: pass\n",
        "pkg/d.py": "import pkg.a\nimport json\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/e.py": "from ..d import x\nfrom . import f\n",
        "pkg/sub/f.py": "",
    })
    edges = module_imports(package)
    assert edges["pkg.sub.e"] == {"pkg.d", "pkg.sub.f"} and edges["pkg.d"] == {"pkg.a"}
    cycles = import_cycles(edges)
    assert cycles == [["pkg.a", "pkg.b", "pkg.c"]]
    assert described(cycles, edges) == ("import cycle among pkg.a, pkg.b, pkg.c: pkg.a -> pkg.b; pkg.b -> pkg.c; "
                                        "pkg.c -> pkg.a")
    (package / "c.py").write_text("class C: pass\n")
    assert import_cycles(module_imports(package)) == []
