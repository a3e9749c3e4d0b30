"""The package's shape: imports run one way (no module imports one that imports it back, however far round), and
nothing imports the project's own modules or the standard library from inside a function, where a cycle hides; and a
training start does not pay for heavy libraries it does not use."""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cifar")
MODULES = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module's top name, or the cifar module for project imports; inside a function?) of a module."""
    with open(os.path.join(PACKAGE, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level > 0:                                     # from .x import y / from . import x
                    names = [child.module] if child.module else [a.name for a in child.names]
                    found.extend((f"cifar.{n.split('.')[0]}", in_function) for n in names)
                elif child.module and child.module.split(".")[0] == "cifar":
                    found.append((".".join(child.module.split(".")[:2]), in_function))
                elif child.module:
                    found.append((child.module.split(".")[0], in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    found.append((".".join(parts[:2]) if parts[0] == "cifar" else parts[0], in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    return {m: {name[len("cifar."):] for name, _ in imports(m) if name.startswith("cifar.")} for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def walk(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert set().union(*edges.values()) <= set(MODULES)          # every project import names a real module
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", MODULES)
def test_no_function_local_import_of_the_project_or_the_standard_library(module):
    local = [name for name, in_function in imports(module) if in_function
             and (name.startswith("cifar") or name in sys.stdlib_module_names)]
    assert local == [], f"cifar/{module}.py imports {local} inside a function; import at the top of the module"


# Each of these costs seconds of import at every process start (train.py, each DDP rank, each sweep run), and a
# training run needs none unless its config asks: torchvision for a policy or a torchvision: model, matplotlib for
# evaluate's PNGs, wandb when W&B is on.
HEAVY = ("torchvision", "matplotlib", "wandb")


def test_a_training_start_imports_no_heavy_library_it_does_not_need():
    """What train.py imports up to training (cifar.train_cli, the engine, a debug config resolved and checked) leaves
    torchvision, matplotlib and wandb unimported. A process: sys.modules here holds whatever other tests imported."""
    code = ("import sys; from cifar.train_cli import main; import cifar.engine; "
            "from cifar.config import load_config; load_config('configs/debug.yaml', ['data.augment=true']); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    root = os.path.dirname(PACKAGE)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"], f"imported at a training start: {proc.stdout.strip()}"
