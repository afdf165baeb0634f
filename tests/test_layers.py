"""The layers of the boxloss package and the direction of its imports, read from the source (nothing is imported).

Layers, each importing only from itself and the layers below:

    0 foundation  boxloss._extension, _checks, _build_info, _pydensecrf, _fallback, _C
    1 ops         boxloss.ops.*        (op wrappers beside their fake kernels and autograd)
    2 losses      boxloss.losses.*, boxloss.metrics
    3 recipes     boxloss.recipes.*    (a paper's composition with its defaults)
    4 package     boxloss/__init__.py  (re-exports the public names: the public API)
    5 trainers    boxloss.trainers.*   (worked examples on the public API: they import boxloss and boxloss.data
                                        only)

Beside them:

- ``boxloss.data`` may import the foundation, ``boxloss.ops.boxes`` and itself; only recipes and trainers import it;
- ``boxloss.reference`` (the test oracle) is a leaf: it imports only itself (and ``boxloss._checks``, and
  ``boxloss._pydensecrf``, the one adapter to pydensecrf, for the comparison with Krähenbühl's lattice), and only
  ``tests/``, ``benchmarks/`` and ``boxloss/_fallback.py`` import it.

A new module that fits no layer fails the test until it is given one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "boxloss"

FOUNDATION = {"_extension", "_checks", "_build_info", "_pydensecrf", "_fallback", "_C"}
NUMBERED = {"foundation": 0, "ops": 1, "losses": 2, "recipes": 3, "package": 4, "trainers": 5}
DATA_MAY_IMPORT = {"boxloss.ops.boxes"}
REFERENCE_IMPORTERS = {"boxloss._fallback"}  # besides tests/ and benchmarks/
REFERENCE_MAY_IMPORT = {"boxloss._checks", "boxloss._pydensecrf"}
OUTSIDE_PACKAGE_SKIP = {"tests", "benchmarks", "build", "dist", ".venv", "venv", ".git"}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of the package, or None when it fits none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in FOUNDATION:
        return "foundation"
    if head == "metrics":
        return "losses"
    if head in ("ops", "losses", "recipes", "trainers", "data", "reference"):
        return head
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(name: str, root: Path) -> str:
    """``boxloss.x.y`` as far as it names a module or package under ``root``; names imported from a module
    (``from boxloss.ops.boxes import pack_boxes``) resolve to that module."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        candidate = root.joinpath(*parts[:end])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts[:end])
        if end == 2 and parts[1] in FOUNDATION:  # compiled or generated: boxloss._C, boxloss._build_info
            return ".".join(parts[:2])
    return parts[0]


def imports_of(source: str, module: str, is_package: bool, root: Path) -> list[tuple[int, str]]:
    """(line, resolved boxloss module) for every import of the package, at module level or inside functions."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((node.lineno, resolve(alias.name, root)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                found.append((node.lineno, resolve(f"{target}.{alias.name}", root)))
    return found


def offences(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (both package modules), or None when it may."""
    if imported == importer or (importer != PACKAGE and imported.startswith(importer + ".")):
        return None
    src, dst = layer_of(importer), layer_of(imported)
    if dst is None:
        return f"imports {imported}, which fits no layer"
    if dst == "reference":
        if src == "reference" or importer in REFERENCE_IMPORTERS:
            return None
        return "imports the test oracle boxloss.reference (only tests, benchmarks and boxloss._fallback may)"
    if src == "reference":
        if imported in REFERENCE_MAY_IMPORT:
            return None
        return f"is in boxloss.reference, a leaf, but imports {imported}"
    if src == "data":
        if dst == "data" or dst == "foundation" or imported in DATA_MAY_IMPORT:
            return None
        return f"is in boxloss.data, which may import only the foundation and boxloss.ops.boxes, but imports {imported}"
    if src == "trainers" and dst not in ("trainers", "package", "data"):
        return f"is a trainer, which imports the public API only (boxloss, boxloss.data), but imports {imported}"
    if dst == "data":
        if NUMBERED[src] >= NUMBERED["recipes"]:
            return None
        return f"(layer {NUMBERED[src]} {src}) imports the datasets {imported} (only recipes and trainers may)"
    if NUMBERED[dst] > NUMBERED[src]:
        return f"(layer {NUMBERED[src]} {src}) imports {imported} (layer {NUMBERED[dst]} {dst}), a higher layer"
    return None


def check_tree(root: Path) -> tuple[list[str], list[str]]:
    """(violations, modules that fit no layer) of the Python files under ``root``."""
    violations, unplaced = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in OUTSIDE_PACKAGE_SKIP or any(p.startswith(".") for p in rel.parts):
            continue
        inside = rel.parts[0] == PACKAGE
        module = module_name(path, root)
        if inside and layer_of(module) is None:
            unplaced.append(str(rel))
            continue
        for line, imported in imports_of(path.read_text(), module, path.name == "__init__.py", root):
            if inside:
                why = offences(module, imported)
            elif layer_of(imported) == "reference":
                why = "imports the test oracle boxloss.reference (only tests, benchmarks and boxloss._fallback may)"
            else:
                why = None
            if why:
                violations.append(f"{rel}:{line} {module} {why}")
    return violations, unplaced


def test_imports_follow_the_layers():
    violations, unplaced = check_tree(ROOT)
    assert not unplaced, "modules that fit no layer (give them one in tests/test_layers.py):\n  " + "\n  ".join(
        unplaced
    )
    assert not violations, f"{len(violations)} imports against the layers:\n  " + "\n  ".join(violations)


def test_every_layer_is_populated():
    # The checker must see the real tree: a typo in ROOT would make the test above pass vacuously.
    seen = {layer_of(module_name(p, ROOT)) for p in (ROOT / PACKAGE).rglob("*.py")}
    assert {"foundation", "ops", "losses", "recipes", "data", "reference", "package"} <= seen


PLANTED = {
    "boxloss/ops/planted.py": "from boxloss.recipes.regularized import RegularizedLoss\n",
    "boxloss/losses/planted.py": "def f():\n    from boxloss.reference.boxes import check_box\n",
    "boxloss/data/planted.py": "from boxloss.losses import box2seg\nfrom boxloss.ops.boxes import pack_boxes\n",
    "boxloss/reference/planted.py": "from boxloss.ops.lattice import LatticeTensors\n",
    "boxloss/ops/planted_relative.py": "from ..losses.region_priors import _foreground\n",
    "boxloss/losses/planted_facade.py": "import boxloss\n",
    "boxloss/ops/planted_data.py": "from boxloss.data.box_crops import crop_boxes\n",
    "boxloss/_checks.py": "from boxloss.ops import boxes\n",
    "boxloss/stray.py": "x = 1\n",
    "tools/script.py": "from boxloss.reference import pairwise\n",
    "boxloss/recipes/fine.py": "from boxloss.data.box_crops import crop_boxes\nfrom boxloss.losses import box2seg\n",
    "boxloss/_fallback.py": "def f():\n    from boxloss.reference.boxes import check_box\n",
}


def test_checker_reports_every_planted_offender(tmp_path):
    for rel in [
        "boxloss/__init__.py",
        "boxloss/ops/__init__.py",
        "boxloss/ops/boxes.py",
        "boxloss/ops/lattice.py",
        "boxloss/losses/__init__.py",
        "boxloss/losses/box2seg.py",
        "boxloss/losses/region_priors.py",
        "boxloss/recipes/__init__.py",
        "boxloss/recipes/regularized.py",
        "boxloss/data/__init__.py",
        "boxloss/data/box_crops.py",
        "boxloss/reference/__init__.py",
        "boxloss/reference/boxes.py",
        "boxloss/reference/pairwise.py",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    violations, unplaced = check_tree(tmp_path)
    assert unplaced == ["boxloss/stray.py"]
    offenders = sorted(v.split(":")[0] for v in violations)
    assert offenders == sorted(
        [
            "boxloss/_checks.py",
            "boxloss/data/planted.py",
            "boxloss/losses/planted.py",
            "boxloss/losses/planted_facade.py",
            "boxloss/ops/planted.py",
            "boxloss/ops/planted_data.py",
            "boxloss/ops/planted_relative.py",
            "boxloss/reference/planted.py",
            "tools/script.py",
        ]
    ), violations


@pytest.mark.parametrize(
    "importer, imported, allowed",
    [
        ("boxloss.losses.box_priors", "boxloss.ops.row_col_max", True),
        ("boxloss.ops.row_col_max", "boxloss.losses.box_priors", False),
        ("boxloss.metrics", "boxloss.ops.box_masks", True),
        ("boxloss.recipes.bana", "boxloss.losses.noise_aware", True),
        ("boxloss.trainers.engine", "boxloss.recipes.bana", False),
        ("boxloss.trainers.engine", "boxloss", True),
        ("boxloss.trainers.box2tagback", "boxloss.data", True),
        ("boxloss", "boxloss.trainers.engine", False),
        ("boxloss.recipes.bana", "boxloss.trainers.engine", False),
        ("boxloss", "boxloss.recipes.bana", True),
        ("boxloss.ops.boxes", "boxloss", False),
        ("boxloss.data.coco", "boxloss.ops.boxes", True),
        ("boxloss.data.coco", "boxloss.ops.box_masks", False),
        ("boxloss.reference.pairwise", "boxloss._checks", True),
        ("boxloss.reference.bilateral", "boxloss._pydensecrf", True),
        ("boxloss.reference.pairwise", "boxloss._extension", False),
    ],
)
def test_rules(importer, imported, allowed):
    assert (offences(importer, imported) is None) is allowed
