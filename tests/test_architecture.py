"""The package's layout rules, checked on its source (AST): private internals, import direction, no cycles.

- Only ``lightning_gns/_compat/`` touches private torch, Lightning and torchmetrics internals: no ``torch._C`` or
  ``lightning.pytorch.x._y`` import, no ``obj._name`` read of an attribute that the package does not define
  itself, no ``getattr(obj, "_name")`` elsewhere. A torch upgrade that renames an internal then costs one
  ``_compat`` function and its test (tests/test_compat.py).
- The report reads logs and never imports the callbacks; the tags both write and read are in ``tags.py``.
- The package's modules import each other without a cycle (function-level imports included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lightning_gns"
THIRD_PARTY = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics")
# Names with a leading underscore that are public API: namedtuple's methods, the ``super()`` override protocol.
PUBLIC_UNDERSCORE = {"_asdict", "_replace", "_fields", "_make", "_field_defaults"}

# Private uses allowed outside `_compat/`: none. A new one goes into a version-gated `_compat` function instead.
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _own_private_names() -> set[str]:
    """Every ``_name`` that the package defines: functions, classes, attributes it assigns, parameters."""
    names: set[str] = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)  # not `strategy._hook = ...`: setting another's private is using it
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, own: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each private third-party internal that ``source`` imports or reads."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in THIRD_PARTY and any(_is_private(p) for p in parts):
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] in THIRD_PARTY:
                if any(_is_private(p) for p in parts):
                    found.append((node.lineno, node.module))
                found += [(node.lineno, a.name) for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                continue  # the package's own attributes (a subclass reading its base's shows up on other objects)
            if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
                continue  # the override protocol of a base class (`super()._load_from_state_dict(...)`)
            dotted = _dotted(node)
            if dotted is not None and dotted.split(".")[0] in THIRD_PARTY:
                found.append((node.lineno, _private_prefix(dotted)))
            elif node.attr not in own and node.attr not in PUBLIC_UNDERSCORE:
                found.append((node.lineno, node.attr))
        elif _names_attribute(node):
            name = node.args[1].value  # type: ignore[attr-defined]  # checked by _names_attribute
            if _is_private(name) and name not in own:
                found.append((node.lineno, name))
    # `torch._C._x` is one use, not one per private part of the chain.
    return sorted(set(found))


def _names_attribute(node: ast.AST) -> bool:
    """``getattr(obj, "name", ...)`` and its siblings, with the name spelled out."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _private_prefix(dotted: str) -> str:
    """``torch._C._autograd.x`` -> ``torch._C``: the name up to its first private part."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[: i + 1])
    return dotted


def test_only_compat_touches_private_internals():
    own = _own_private_names()
    offenders = []
    for path in _modules():
        relative = _relative(path)
        if relative.startswith("_compat/"):
            continue
        for line, what in private_uses(path.read_text(), own):
            if (relative, what) not in ALLOWED:
                offenders.append(f"{relative}:{line}: {what}")
    assert not offenders, (
        "Private torch/Lightning internals outside lightning_gns/_compat/ (move each into a version-gated _compat "
        "function with a test in tests/test_compat.py):\n" + "\n".join(offenders)
    )


def test_the_allow_list_holds_only_uses_that_are_still_there():
    own = _own_private_names()
    present = {(_relative(path), what) for path in _modules() for _, what in private_uses(path.read_text(), own)}
    assert present >= ALLOWED, f"Allow-listed uses that are gone (drop them from ALLOWED): {ALLOWED - present}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch._dynamo", ["torch._dynamo"]),
        ("from torch._dynamo.eval_frame import OptimizedModule", ["torch._dynamo.eval_frame"]),
        ("from torch.nn import _reduction", ["_reduction"]),
        ("from lightning.pytorch.loops.fetchers import _DataFetcher", ["_DataFetcher"]),
        ("import torch\ntorch._C._get_tracing_state()", ["torch._C"]),
        ("import torch\ntorch._foreach_norm([])", ["torch._foreach_norm"]),
        ("strategy._ddp_comm_hook = None", ["_ddp_comm_hook"]),
        ("x = trainer.fit_loop._data_fetcher", ["_data_fetcher"]),
        ("getattr(node, '_saved_reduction', None)", ["_saved_reduction"]),
        # Not private internals: the package's own names, namedtuple methods, self, super().
        ("self._x = 1\nother._x", []),
        ("state._replace(a=1)", []),
        ("super()._load_from_state_dict(1)", []),
        ("import torch.nn.functional as F\nfrom lightning.pytorch import Trainer", []),
    ],
)
def test_the_scan_finds_private_uses(source, expected):
    own = {n for n in ("_x",)}
    assert [what for _, what in private_uses(source, own)] == expected


def _module_name(path: Path) -> str:
    return ("lightning_gns." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``lightning_gns`` modules that ``path`` imports, anywhere in it (function bodies too).

    ``from package import name`` imports the module ``package.name`` when there is one, else ``package`` itself.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lightning_gns")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if not name.startswith("lightning_gns"):
                continue
            submodules = {f"{name}.{a.name}" for a in node.names} & modules
            out |= submodules
            if len(submodules) < len(node.names):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in _modules()}
    return {
        name: {target for target in _imports_of(path, set(files)) if target in files and target != name}
        for name, path in files.items()
    }


def test_the_package_has_no_import_cycle():
    graph = _graph()
    # The top-level __init__ only re-exports: `from lightning_gns import __version__` is not a cycle through it.
    for targets in graph.values():
        targets.discard("lightning_gns")
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "Import cycles (a function-level import counts: it only hides the cycle):\n" + "\n".join(cycles)


def test_the_report_does_not_import_the_callbacks():
    graph = _graph()
    report = {name: targets for name, targets in graph.items() if name.startswith("lightning_gns.report")}
    wrong = {
        name: sorted(t for t in targets if t.startswith("lightning_gns.callbacks")) for name, targets in report.items()
    }
    wrong = {name: targets for name, targets in wrong.items() if targets}
    assert not wrong, f"The report reads logs and takes its tags from lightning_gns.tags, not the callbacks: {wrong}"


def test_the_callbacks_ask_sources_what_they_can_do_rather_than_test_their_class():
    from lightning_gns import sources  # noqa: F401  # the concrete source classes are named below
    from lightning_gns.sources.base import GradientSource

    concrete = {cls.__name__ for cls in _subclasses(GradientSource)}
    assert {"PerExampleSource", "DDPSource", "AccumulationSource"} <= concrete
    offenders = []
    for path in sorted((PACKAGE / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                offenders += [f"{_relative(path)}:{node.lineno}: isinstance(..., {n})" for n in named & concrete]
    assert not offenders, "Test what a source can do (a GradientSource attribute) instead of its class:\n" + "\n".join(
        offenders
    )


def _subclasses(cls: type) -> set[type]:
    import lightning_gns.sources.accumulation
    import lightning_gns.sources.ddp
    import lightning_gns.sources.per_example  # noqa: F401  # registers the subclasses

    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found
