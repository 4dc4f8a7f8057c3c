"""The package imports one way: each module only from the layers below it, counting imports inside functions.

The layers read as the data flows (README "Layout"): recipe -> model / data / hardware -> ds_config -> plan ->
resolve -> trainer / export -> launch / commands -> cli. A subpackage (zero_trainer/plan/) is one layer for the rest
of the package, and its own modules import one way too (PLAN_MODULES).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zero_trainer"
LAYERS = [
    {"errors", "presets", "shipped"},
    {"recipe", "hardware", "probe", "ops", "metrics", "chat"},
    {"model", "data"},
    {"ds_config", "moe", "pretrained", "lora"},
    {"plan", "checkpoint"},
    {"parallelize", "pipeline"},
    {"resolve"},
    {"trainer", "export"},
    {"train", "launch", "plan_report", "report", "doctor"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# zero_trainer/plan/, in import order: each module imports only from those before it (and __init__ from all)
PLAN_MODULES = ["shapes", "knobs", "memory", "speed", "history", "choice"]


def _type_checking_only(node, parents) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in parents)


def imported_modules(path: Path) -> set[str]:
    """zero_trainer modules `path` imports anywhere (module level or inside functions), TYPE_CHECKING aside, as dotted
    names below zero_trainer ("hardware", "plan", "plan.shapes"); relative imports resolved from where `path` lies
    (a file outside the package counts as a top-level module)."""
    here = path.parent.relative_to(PACKAGE).parts if path.is_relative_to(PACKAGE) else ()
    found = set()

    def visit(node, parents):
        if isinstance(node, ast.ImportFrom) and not _type_checking_only(node, parents):
            module = node.module or ""
            if node.level:  # relative to where `path` lies
                base = list(here[:len(here) - (node.level - 1)])
            elif module.split(".")[0] == "zero_trainer":
                base, module = [], module.removeprefix("zero_trainer").lstrip(".")
            else:
                base = None
            if base is not None and module:
                found.add(".".join(base + [module]))
            elif base is not None:  # from . import a, b
                found.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import) and not _type_checking_only(node, parents):
            found.update(a.name.removeprefix("zero_trainer.") for a in node.names if a.name.startswith("zero_trainer."))
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(ast.parse(path.read_text()), [])
    return {name for name in found if name}


def layer_of(path: Path) -> str:
    """The layer a file belongs to: its stem, or its subpackage's name for a file inside one."""
    inside = path.parent.relative_to(PACKAGE).parts if path.is_relative_to(PACKAGE) else ()
    return inside[0] if inside else path.stem


def imports_of(path: Path) -> set[str]:
    """The layers `path` imports: top-level modules, a subpackage as one (`.plan`, `.plan.shapes` -> "plan")."""
    return {name.split(".")[0] for name in imported_modules(path)} - {layer_of(path)}


def package_files() -> list[Path]:
    """Every module of the package, subpackages' included, but the top-level __init__."""
    return sorted(p for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")] if p != PACKAGE / "__init__.py")


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}  # a subpackage: one layer
    assert modules == set(LAYER), f"unplaced: {sorted(modules - set(LAYER))}, gone: {sorted(set(LAYER) - modules)}"


def test_imports_go_only_downward():
    upward = []
    for path in package_files():
        layer = layer_of(path)
        for target in imports_of(path):
            if LAYER[target] >= LAYER[layer]:
                upward.append(f"{path.relative_to(PACKAGE)} (layer {LAYER[layer]}) imports {target} "
                              f"(layer {LAYER[target]})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .recipe import x\n\ndef f():\n    from . import trainer, model\n"
                     "    import zero_trainer.plan\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import y\n")
    assert imports_of(probe) == {"recipe", "trainer", "model", "plan"}


def test_the_plan_package_imports_one_way():
    """Inside zero_trainer/plan/ each module imports only the modules before it in PLAN_MODULES (never the package's
    __init__), and relatively: no `zero_trainer.` import names the package it is in. __init__ re-exports them all."""
    plan = PACKAGE / "plan"
    assert {p.stem for p in plan.glob("*.py")} - {"__init__"} == set(PLAN_MODULES)
    wrong = []
    for i, name in enumerate(PLAN_MODULES):
        path = plan / f"{name}.py"
        for target in sorted(m for m in imported_modules(path) if m.split(".")[0] == "plan"):
            if target.removeprefix("plan.") not in PLAN_MODULES[:i]:
                wrong.append(f"plan/{name}.py imports {target}")
        absolute = [node for node in ast.walk(ast.parse(path.read_text())) if (
            isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("zero_trainer")) or (
            isinstance(node, ast.Import) and any(a.name.startswith("zero_trainer") for a in node.names))]
        wrong += [f"plan/{name}.py line {node.lineno}: an absolute zero_trainer import" for node in absolute]
    assert not wrong, "\n".join(wrong)
    assert {m for m in imported_modules(plan / "__init__.py") if m.startswith("plan.")} == {
        f"plan.{name}" for name in PLAN_MODULES}


def test_the_checker_resolves_a_subpackage_s_relative_imports():
    knobs = PACKAGE / "plan" / "knobs.py"
    assert {"ds_config", "hardware", "recipe", "plan.shapes"} <= imported_modules(knobs)
    assert imports_of(knobs) == {"ds_config", "hardware", "recipe"}  # plan.shapes is inside its own layer
    assert "plan" in imports_of(PACKAGE / "resolve.py")
