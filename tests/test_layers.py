"""The package imports one way: each module only from the layers below it, counting imports inside functions.

The layers read as the data flows (README "Layout"): recipe -> model / data / hardware -> ds_config -> plan ->
resolve -> trainer / export -> launch / commands -> cli.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zero_trainer"
LAYERS = [
    {"errors", "presets", "shipped"},
    {"recipe", "hardware", "ops", "metrics", "chat"},
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


def _type_checking_only(node, parents) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in parents)


def imports_of(path: Path) -> set[str]:
    """zero_trainer modules `path` imports anywhere (module level or inside functions), TYPE_CHECKING aside."""
    found = set()

    def visit(node, parents):
        if isinstance(node, ast.ImportFrom) and not _type_checking_only(node, parents):
            if node.level == 1 or (node.module or "").startswith("zero_trainer"):
                base = (node.module or "").removeprefix("zero_trainer").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import a, b
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import) and not _type_checking_only(node, parents):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("zero_trainer."))
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(ast.parse(path.read_text()), [])
    return found - {path.stem}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER), f"unplaced: {sorted(modules - set(LAYER))}, gone: {sorted(set(LAYER) - modules)}"


def test_imports_go_only_downward():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        for target in imports_of(path):
            if LAYER[target] >= LAYER[path.stem]:
                upward.append(f"{path.stem} (layer {LAYER[path.stem]}) imports {target} (layer {LAYER[target]})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .recipe import x\n\ndef f():\n    from . import trainer, model\n"
                     "    import zero_trainer.plan\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import y\n")
    assert imports_of(probe) == {"recipe", "trainer", "model", "plan"}
