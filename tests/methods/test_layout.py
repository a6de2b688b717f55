"""The layout of ``cl_lightning/methods/``: a method file takes nothing from another method's file but its base class.

Shared plumbing lives in the shared modules (``CONVENTIONS.md``, rule 13): ``base``, ``exemplar``, ``regularizer``,
``replay``, ``strength``, ``cl_lightning/validation.py`` and ``core/``. Subclassing a method (``DER++`` from
``DER``) is the one sanctioned method-to-method import: the imported name must be a base of a class the file defines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cl_lightning.methods

METHODS_DIR = Path(cl_lightning.methods.__file__).parent
PACKAGE = "cl_lightning.methods"
SHARED = {"base", "exemplar", "regularizer", "replay", "strength"}

# (importing module, imported method module) pairs that break the rule today, each to be removed with its cause;
# the test fails when one no longer occurs, so the list only shrinks
KNOWN: set[tuple[str, str]] = set()


def sibling(node: ast.ImportFrom) -> str | None:
    """The method module a ``from ... import`` takes from (``None``: not a module of this package)."""
    if node.level == 1:  # from .er import X / from . import er
        return node.module.split(".")[0] if node.module else None
    if node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
        return node.module.removeprefix(PACKAGE + ".").split(".")[0]
    return None


def offences(path: Path) -> set[tuple[str, str]]:
    """``(this module, sibling method module)`` for every import of something other than a base class."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bases = {
        base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for base in node.bases
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {
                (path.stem, alias.name.removeprefix(PACKAGE + ".").split(".")[0])
                for alias in node.names
                if alias.name.startswith(PACKAGE + ".")
            }
        elif isinstance(node, ast.ImportFrom) and (module := sibling(node)) is not None:
            if node.level == 1 and node.module is None:  # from . import er: a whole sibling module
                found |= {(path.stem, alias.name) for alias in node.names}
            elif any((alias.asname or alias.name) not in bases for alias in node.names):
                found.add((path.stem, module))
    return {(this, other) for this, other in found if other not in SHARED and other != this}


def all_offences() -> set[tuple[str, str]]:
    return {o for path in sorted(METHODS_DIR.glob("*.py")) for o in offences(path)}


def test_method_modules_import_only_shared_modules_and_base_classes() -> None:
    new = all_offences() - KNOWN
    assert not new, (
        f"method modules importing helpers from another method's module: {sorted(new)}; move the shared code to "
        "methods/base.py, regularizer.py, replay.py, strength.py, cl_lightning/validation.py or core/ "
        "(importing a class to subclass it is fine)"
    )


def test_known_offences_still_occur() -> None:
    gone = KNOWN - all_offences()
    assert not gone, f"fixed, so remove from KNOWN in {Path(__file__).name}: {sorted(gone)}"


def test_the_check_sees_helpers_and_allows_subclassing(tmp_path: Path) -> None:
    (tmp_path / "child.py").write_text(
        "from cl_lightning.methods.er import ER, gather\n"
        "from cl_lightning.methods.ewc import EWC\n"
        "from cl_lightning.methods.regularizer import QuadraticRegularizer, task_importance\n"
        "from .der import DER\n"
        "class Child(EWC):\n    pass\n"
    )
    assert offences(tmp_path / "child.py") == {("child", "er"), ("child", "der")}
