"""The project's layers import in one direction only (docs/architecture.md, "Layers").

Every project .py file's imports are read with `ast` (imports inside functions and
relative imports included) and mapped to the project's top-level package or module; an
import of a project layer that the importing layer may not use fails, naming the file,
the line and the import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MODEL = {"maskrcnn", "builder", "generalized_rcnn"}
STAGES = {"backbones", "proposal", "pooling", "heads", "layers"}
LEAVES = {"tools", "libs", "configs"}
# importing layer -> the project layers it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    # generalized_rcnn is the model class that builder builds and MaskRCNN extends
    "maskrcnn": {"builder", "generalized_rcnn", "convert", "configs", "tools"},
    "builder": STAGES | {"generalized_rcnn", "tools", "libs"},
    "generalized_rcnn": {"tools", "libs"},
    **{stage: STAGES | {"tools", "libs"} for stage in STAGES},
    "deploy": MODEL | STAGES | LEAVES,
    "convert": MODEL | STAGES | LEAVES,
    "tools": set(),
    "libs": set(),
    "configs": set(),
}
LAYERS = set(ALLOWED) | {"engine"}
# Not part of the package: tests, benchmarks and the build script may import anything.
NOT_CHECKED = {"tests", "bench", "setup.py", "docs"}


def layer_of(path: Path, root: Path) -> str | None:
    """The top-level package or module a file belongs to ("tools" for tools/boxes.py,
    "maskrcnn" for maskrcnn.py), None for a file outside the checked layers."""
    first = path.relative_to(root).parts[0]
    name = first[:-3] if first.endswith(".py") else first
    if first in NOT_CHECKED or name not in LAYERS:
        return None
    return name


def imported_layers(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """(line, imported project layer, the import as written) for every import in the
    file, at any depth; relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(root).parent.parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
            shown = "import " + ", ".join(targets)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # from . import x / from ..pkg import y
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + tuple(filter(None, [node.module])))
            else:
                module = node.module or ""
            # `from pkg import mod` names the package's layer either way
            targets = [module] if module else [alias.name for alias in node.names]
            shown = (f"from {'.' * node.level}{node.module or ''} import "
                     + ", ".join(alias.name for alias in node.names))
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top in LAYERS:
                found.append((node.lineno, top, shown))
    return found


def layering_violations(root: Path) -> list[str]:
    """'file:line: layer imports other (the import)' for every forbidden import below
    root, in file order."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        if any(part.startswith(".") or part == "build" for part in path.relative_to(root).parts):
            continue
        layer = layer_of(path, root)
        if layer is None or layer == "engine":       # engine may import anything
            continue
        for line, target, shown in imported_layers(path, root):
            if target != layer and target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(root)}:{line}: {layer} may not import "
                                f"{target} ({shown})")
    return problems


def test_imports_follow_the_layers():
    problems = layering_violations(REPO)
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("file, source, expected", [
    ("tools/bad.py", "def f():\n    from heads import mask_head\n",
     "tools/bad.py:2: tools may not import heads (from heads import mask_head)"),
    ("heads/bad.py", "import engine.train\n",
     "heads/bad.py:1: heads may not import engine (import engine.train)"),
    ("convert/bad.py", "from engine import cli\n",
     "convert/bad.py:1: convert may not import engine (from engine import cli)"),
    ("deploy/sub/bad.py", "from ...engine import train\n",
     "deploy/sub/bad.py:1: deploy may not import engine (from ...engine import train)"),
    ("maskrcnn.py", "import deploy\n",
     "maskrcnn.py:1: maskrcnn may not import deploy (import deploy)"),
])
def test_the_checker_flags_a_planted_import(tmp_path, file, source, expected):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    # allowed arrows next to it are not reported
    (tmp_path / "engine").mkdir(exist_ok=True)
    (tmp_path / "engine" / "ok.py").write_text("import deploy\nfrom heads import x\n")
    (tmp_path / "heads").mkdir(exist_ok=True)
    (tmp_path / "heads" / "ok.py").write_text("from . import y\nfrom tools.boxes import z\n")
    assert layering_violations(tmp_path) == [expected]
