"""imlt.trainer has no import cycles, function-level imports included, and the step contracts
depend on nothing but the config.

A cycle hidden behind a function-level import works until someone moves that import to the
top of its module; this test reads every import statement of every module (the AST, not the
modules' runtime state), so such a cycle fails here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import imlt.trainer

ROOT = Path(imlt.trainer.__file__).parent
PACKAGE = "imlt.trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The imlt.trainer module an imported name refers to (a module, or the package holding a name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every imlt.trainer module `module` imports anywhere in its body (functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # TYPE_CHECKING imports count too
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = _resolve(name) if name.startswith(PACKAGE) else None
            if target and target != module:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_trainer() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    # a package's __init__ importing its own submodules is how packages re-export; not a cycle
    for m, targets in graph.items():
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in targets if not t.startswith(m + ".")}
    cycles = _cycles(graph)
    detail = [" -> ".join(c) + "\n    " + "\n    ".join(f"{a} imports {sorted(graph[a] & set(c))}" for a in c)
              for c in cycles]
    assert not cycles, "import cycles in imlt.trainer:\n" + "\n".join(detail)


def test_the_step_contracts_import_only_the_config() -> None:
    assert imports_of("imlt.trainer.step_models") == {"imlt.trainer.config"}


def test_implementations_take_their_contracts_from_step_models_not_the_registry() -> None:
    importers = sorted(m for m in MODULES if "imlt.trainer.steps" in imports_of(m))
    # only the adapters inside trainer (the CLI and the in-process pipeline) use the registry
    assert set(importers) <= {"imlt.trainer.cli", "imlt.trainer.pipeline", "imlt.trainer.demo"}, importers


def test_the_registry_holds_every_step_with_its_contract() -> None:
    from imlt.trainer import step_models, steps

    assert {"read_data", "validate", "train", "train_remote", "evaluate", "publish", "import_model"} <= set(steps.STEPS)
    for name, step in steps.STEPS.items():
        assert step.name == name and steps.STEPS[name] is getattr(steps, name)
        assert issubclass(step.input_model, step_models.StepModel) and issubclass(step.output_model, step_models.StepModel)
        assert step.run.__annotations__["inp"] in (step.input_model.__name__, step.input_model)
