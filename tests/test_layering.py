"""The layering rule, enforced by reading imports: routes, services and schemas never touch ML libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"
HEAVY = ("torch", "transformers", "peft", "sklearn", "imblearn", "joblib", "numpy", "safetensors", "app.inference")
LIGHT_LAYERS = ("api", "services", "schemas")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    sorted(p for layer in LIGHT_LAYERS for p in (APP / layer).rglob("*.py")),
    ids=lambda p: str(p.relative_to(APP)),
)
def test_light_layers_import_no_ml_library(path):
    heavy = {m for m in imported_modules(path) if any(m == h or m.startswith(h + ".") for h in HEAVY)}
    assert heavy == set(), f"{path.name} imports {sorted(heavy)}"


def test_every_module_says_what_it_is_for():
    for path in APP.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path.relative_to(APP)} has no module docstring"
