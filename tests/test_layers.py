"""The repository's packages import only downwards: brainage_core (the runtime core vendored into every
bundle zip) < data_prep, custom_components < workflows. data_prep and custom_components are two separate
users of the core and never import each other. Inside custom_components, what both bundles share
(``common``) is below what one bundle owns (``slice_cnn``, ``tgb_gan``), which never import each other.

Every ``import``/``from ... import`` (at module level or inside a function, relative ones resolved) and every
``importlib.import_module("...")`` with a literal name is checked.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> layer; an import must go to a lower layer or stay inside its own package
LAYERS = {"brainage_core": 0, "data_prep": 1, "custom_components": 1, "workflows": 2}
# the same inside custom_components: common < slice_cnn, tgb_gan
OWNERS = {"common": 0, "slice_cnn": 1, "tgb_gan": 1}
SOURCES = sorted(p for package in LAYERS if (REPO / package).is_dir() for p in (REPO / package).rglob("*.py")
                 if "__pycache__" not in p.parts)


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted module name of a source file and whether it is a package's ``__init__``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return (".".join(parts[:-1]), True) if parts[-1] == "__init__" else (".".join(parts), False)


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """``(line, [absolute dotted names])`` of every import in ``tree``: ``from a.b import c`` gives ``a.b`` and
    ``a.b.c`` (``c`` may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield node.lineno, [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, [node.args[0].value]


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None when it may."""
    source, target = importer.split("."), imported.split(".")
    if target[0] not in LAYERS:
        return None  # the standard library or a third-party package
    if source[0] != target[0]:
        if LAYERS[target[0]] > LAYERS[source[0]]:
            return f"{source[0]} (layer {LAYERS[source[0]]}) imports the higher {target[0]} (layer {LAYERS[target[0]]})"
        if LAYERS[target[0]] == LAYERS[source[0]]:
            return f"{source[0]} imports {target[0]}: both are layer {LAYERS[source[0]]}, neither may import the other"
        return None
    if source[0] == "custom_components" and len(source) > 1 and len(target) > 1:
        mine, theirs = source[1], target[1]
        if mine in OWNERS and theirs in OWNERS and mine != theirs and OWNERS[theirs] >= OWNERS[mine]:
            return (f"custom_components.{mine} imports custom_components.{theirs}: "
                    + ("what both bundles share may not import one bundle's code" if OWNERS[theirs] > OWNERS[mine]
                       else "one bundle's code may not import the other's"))
    return None


def test_sources_found():
    assert {p.relative_to(REPO).parts[0] for p in SOURCES} >= {"data_prep", "custom_components"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_go_down_the_layers(path):
    module, is_package = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for line, names in imported_modules(tree, module, is_package):
        why = next(((name, reason) for name in names if (reason := violation(module, name))), None)
        if why:
            found.append(f"{path.relative_to(REPO)}:{line}: import of {why[0]}: {why[1]}")
    assert not found, "imports that go up the layers (or across them):\n" + "\n".join(sorted(set(found)))
