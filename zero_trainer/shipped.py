"""Where the shipped recipes/ and ds_configs/ are, so `--recipe debug` and `--ds-config zero2` work anywhere.

A checkout keeps them at the repository's top level (the layout users and tools read); a wheel carries the same
files inside the package (pyproject.toml maps them there as package data).
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def shipped_dir(name: str) -> Path:
    """`recipes` or `ds_configs`: inside the installed package if there, else beside it in the checkout."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else REPO_ROOT / name


RECIPE_DIR = shipped_dir("recipes")
DS_CONFIG_DIR = shipped_dir("ds_configs")
