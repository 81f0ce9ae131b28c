"""The layout's import rules, checked on the source tree (pure AST: nothing is imported).

docs/architecture.md ("Layout") states them: the four sides (`cqrs.commands`,
`cqrs.relay`, `cqrs.projector`, `cqrs.queries`) import none of each other, not even
lazily inside a function; they meet in the kernel (`cqrs`), which imports none of them
nor the composition (`cqrs.app`); no module import cycles, lazy imports counted; and
nothing imports the old top-level names (`commands`, `projector`, ...), which no longer
exist once installed.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Installed package -> its folder in the repository (pyproject's package-dir), plus the
# kernel, which is its own folder.
PACKAGE_DIRS: dict[str, str] = {
    "cqrs": "cqrs",
    **PYPROJECT["tool"]["setuptools"]["package-dir"],
}
SIDES = ("cqrs.commands", "cqrs.relay", "cqrs.projector", "cqrs.queries")
COMPOSITION = "cqrs.app"
OLD_NAMES = ("commands", "projector", "queries", "relay", "app")
# Folders whose Python files must not use the old names either (not installed).
OTHER_DIRS = ("bench", "tests", "examples")
SKIP_PARTS = {".venv", "__pycache__", "build", "dist", ".cqrs"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (as written, resolved if relative)
    line: int
    lazy: bool  # inside a function or method
    typing_only: bool  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        how = "lazy " if self.lazy else ""
        return f"{self.source}:{self.line} {how}imports {self.target}"


def _python_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*.py")):
        if not SKIP_PARTS.intersection(path.relative_to(REPO).parts):
            yield path


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def installed_modules() -> dict[str, Path]:
    """Every module the distribution installs, by name. A kernel subfolder that is also
    a mapped package (none today) would be listed under the mapping."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        root = REPO / folder
        for path in _python_files(root):
            modules[_module_name(package, root, path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, is_package: bool) -> list[Import]:
    """Every import statement of a file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            child_typing = typing_only
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, child_lazy, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, child_lazy, typing_only)
                continue
            visit_stmt(child, child_lazy, child_typing)

    def visit_stmt(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, lazy, typing_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            # `from pkg import mod` imports the module pkg.mod when there is one.
            for alias in node.names:
                found.append(
                    Import(module, f"{target}.{alias.name}", node.lineno, lazy, typing_only)
                )
        visit(node, lazy, typing_only)

    visit(tree, False, False)
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The installed module an import names: the longest known prefix of `target`."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def graph(*, lazy: bool) -> dict[str, dict[str, Import]]:
    """Module -> the installed modules it imports (module level only, or all)."""
    modules = installed_modules()
    edges: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, path.name == "__init__.py"):
            if imp.typing_only or (imp.lazy and not lazy):
                continue
            target = _resolve(imp.target, modules)
            if target is not None and target != name:
                edges[name].setdefault(target, imp)
    return edges


def area(module: str) -> str:
    """The side, the composition, or the kernel a module belongs to."""
    for name in (*SIDES, COMPOSITION):
        if module == name or module.startswith(name + "."):
            return name
    return "cqrs"


def all_imports() -> Iterator[Import]:
    modules = installed_modules()
    for name, path in modules.items():
        yield from imports_of(name, path, path.name == "__init__.py")


def cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def _describe(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    members = set(component)
    return "; ".join(
        str(imp) for name in component for target, imp in edges[name].items() if target in members
    )


# --- the rules -----------------------------------------------------------------------------


def test_the_sides_import_none_of_each_other_nor_the_composition() -> None:
    modules = installed_modules()
    wrong = []
    for imp in all_imports():
        source_area = area(imp.source)
        if source_area not in SIDES:
            continue
        target = _resolve(imp.target, modules)
        if target is None:
            continue
        target_area = area(target)
        if target_area != source_area and target_area != "cqrs":
            wrong.append(str(imp))
    assert not wrong, "a side imports another side (or the composition):\n" + "\n".join(wrong)


def test_the_kernel_imports_no_side_nor_the_composition() -> None:
    modules = installed_modules()
    wrong = []
    for imp in all_imports():
        if area(imp.source) != "cqrs":
            continue
        target = _resolve(imp.target, modules)
        if target is not None and area(target) != "cqrs":
            wrong.append(str(imp))
    assert not wrong, "the kernel imports a side or the composition:\n" + "\n".join(wrong)


def test_no_import_cycles_at_module_level() -> None:
    edges = graph(lazy=False)
    found = cycles(edges)
    assert not found, "\n".join(_describe(c, edges) for c in found)


def test_no_import_cycles_even_counting_lazy_imports() -> None:
    edges = graph(lazy=True)
    found = cycles(edges)
    assert not found, "\n".join(_describe(c, edges) for c in found)


def test_nothing_imports_the_old_top_level_names() -> None:
    """`commands`, `projector`, ... exist only as folders; installed, they are `cqrs.*`."""
    wrong = []
    folders = [*PACKAGE_DIRS.values(), *OTHER_DIRS]
    for folder in folders:
        root = REPO / folder
        if not root.is_dir():
            continue
        for path in _python_files(root):
            for imp in imports_of("?", path, False):
                if imp.target.split(".")[0] in OLD_NAMES and not imp.target.startswith("."):
                    wrong.append(f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}")
    assert not wrong, "\n".join(wrong)


def test_entry_points_name_installed_modules() -> None:
    modules = installed_modules()
    project = PYPROJECT["project"]
    references = [*project["scripts"].values()]
    for group in project.get("entry-points", {}).values():
        references += group.values()
    for reference in references:
        module = reference.split(":")[0]
        assert module in modules, f"{reference}: no module {module} under cqrs"


def test_the_rules_see_a_forbidden_import() -> None:
    """The checks above are not vacuous: the graph holds the edges they judge."""
    edges = graph(lazy=True)
    assert "cqrs.relay.outbox" in edges["cqrs.relay.cli"]
    assert "cqrs.commands.cli" in edges  # the folders are mapped into cqrs
    assert any(area(t) in SIDES for t in edges["cqrs.app.cli"])  # composition sees sides
    lazy = [i for i in all_imports() if i.lazy]
    assert lazy, "no lazy import found: the walker does not enter functions"
