"""The import graph runs one way: training -> service, model; service -> model; model -> nothing
of ours. Checked on the source (every import statement, at any depth), so a lazy import inside
a function counts too."""

import ast
import gc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"model": {"service", "training"}, "service": {"training"}}


@pytest.fixture(autouse=True)
def no_collection_while_parsing():
    """The garbage collector held off while these tests parse. CPython 3.11's AST constructor is
    not reentrant: a finalizer that logs a traceback (which parses source lines to place its
    carets) in the middle of a parse fails it with "AST constructor recursion depth mismatch".
    An asyncio task an earlier test left with its error unread is such a finalizer."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_downstream(package):
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_relative_imports_stay_inside_their_package():
    for package in ("model", "service", "training"):
        for path in (ROOT / package).rglob("*.py"):
            depth = len(path.relative_to(ROOT / package).parts) - 1  # folders below the package root
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    assert node.level - 1 <= depth, f"{path}: a relative import leaves {package}/"
