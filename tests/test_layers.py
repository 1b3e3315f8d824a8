"""The import contract of src/raresift: layers that import only downwards, no cycles, no string imports.

Layers, lowest first (a module imports modules of its own layer or of lower ones):

    0  errors, settings
    1  store
    2  embed, learn, index, ray_jobs
    3  project, evaluate, export, simulate, labelling
    4  cli, commands, web, notebook, demo, __main__, the package itself (raresift/__init__.py)

Imports inside functions count; those under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "raresift"
LAYERS = [
    ("errors", "settings"),
    ("store",),
    ("embed", "learn", "index", "ray_jobs"),
    ("project", "evaluate", "export", "simulate", "labelling"),
    ("cli", "commands", "web", "notebook", "demo", "__main__", ""),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py; add it there")


class Imports(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: set[str]):
        self.name, self.is_package, self.known = name, is_package, known
        self.found: set[str] = set()
        self.string_imports: list[int] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def _target(self, dotted: str) -> None:
        while dotted and dotted not in self.known:
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != self.name:
            self.found.add(dotted)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self._target(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".")
            if not self.is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            full = f"{module}.{alias.name}"
            self._target(full if full in self.known else module)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if fname in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            # Names given as text (computed names are third-party ones: weight packages, solvers).
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in (PACKAGE, ""):
                self.string_imports.append(node.lineno)
        self.generic_visit(node)


def graph() -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    mods = modules()
    known = set(mods)
    edges, strings = {}, {}
    for name, path in mods.items():
        v = Imports(name, path.name == "__init__.py", known)
        v.visit(ast.parse(path.read_text(), str(path)))
        edges[name] = v.found
        if v.string_imports:
            strings[name] = v.string_imports
    return edges, strings


def test_imports_point_down_the_layers():
    edges, _ = graph()
    broken = [f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer(b) > layer(a)]
    assert not broken, "imports against the layers:\n" + "\n".join(sorted(broken))


def test_no_import_cycles():
    edges, _ = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    # The package's __init__ imports Project and is imported by every `from raresift import ...`;
    # it is the top of the graph, not part of a cycle through a lower module.
    assert not cycles, f"import cycles: {cycles}"


def test_no_string_imports_of_the_package_own_modules():
    _, strings = graph()
    assert not strings, f"importlib / __import__ of raresift's own modules: {strings}"
