"""The layering rules, enforced by reading imports with `ast`: every import statement of a module counts,
at any depth (inside functions, under `if TYPE_CHECKING:`), relative ones resolved, and a literal
`importlib.import_module("...")` too. Each violation is reported as file:line."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app"
ML = ("torch", "transformers", "peft", "sklearn", "imblearn", "joblib", "numpy", "safetensors")


@dataclass(frozen=True)
class Rule:
    name: str
    files: tuple[str, ...]  # globs relative to the repository root
    forbidden: tuple[str, ...]  # module names; a submodule of one is forbidden too


RULES = [
    Rule("routes never import the inference layer or an ML library", ("app/api/**/*.py",), (*ML, "app.inference")),
    Rule("services never import the inference layer or an ML library", ("app/services/**/*.py",), (*ML, "app.inference")),
    Rule("schemas never import the inference layer or an ML library", ("app/schemas/**/*.py",), (*ML, "app.inference")),
    Rule("the inference layer never imports routes or services", ("app/inference/**/*.py",), ("app.api", "app.services")),
    Rule("training never imports routes or services", ("training/**/*.py",), ("app.api", "app.services")),
    Rule(
        "config, errors, logs and artifacts import no ML library",
        ("app/config.py", "app/errors.py", "app/logs.py", "app/artifacts.py"),
        ML,
    ),
]


@dataclass(frozen=True)
class Import:
    module: str
    line: int


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every module `source` imports, wherever the statement is. `from a import b` counts as `a` and as
    `a.b` (b may be a submodule); relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                found.append(Import(base, node.lineno))
            found.extend(Import(f"{base}.{alias.name}" if base else alias.name, node.lineno) for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return found


def is_under(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def files_of(rule: Rule, root: Path = REPO) -> list[Path]:
    return sorted({p for pattern in rule.files for p in root.glob(pattern)})


def violations(rule: Rule, root: Path = REPO) -> list[str]:
    found = []
    for path in files_of(rule, root):
        seen = set()
        for item in imports(path.read_text(encoding="utf-8"), module_name(path, root), path.name == "__init__.py"):
            hit = next((f for f in rule.forbidden if is_under(item.module, f)), None)
            if hit is not None and (item.line, hit) not in seen:
                seen.add((item.line, hit))
                found.append(f"{path.relative_to(root)}:{item.line} imports {item.module}")
    return found


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_layering_rule(rule):
    assert files_of(rule), f"no file matches {rule.files}: the rule checks nothing"
    found = violations(rule)
    assert found == [], f"{rule.name}:\n  " + "\n  ".join(found)


# -- the reader itself: a rule that cannot fail proves nothing ---------------------------------------------

SAMPLE = '''
"""A module with imports in every place the reader must look."""
import os, torch.nn as nn
from typing import TYPE_CHECKING
from app import inference
from . import sibling
from ..api.routes import nli
if TYPE_CHECKING:
    from peft import PeftModel


def later():
    import sklearn.linear_model
    from .. import services

    class Inner:
        def method(self):
            from app.inference.engine import NLIEngine


def dynamic():
    import importlib
    return importlib.import_module("transformers")
'''


def test_the_reader_finds_imports_everywhere_and_resolves_relative_ones():
    found = {(i.module, i.line) for i in imports(SAMPLE, "app.services.sample")}
    expected = {
        ("os", 3),
        ("torch.nn", 3),
        ("app.inference", 5),
        ("app.services.sibling", 6),
        ("app.api.routes.nli", 7),
        ("peft", 9),
        ("sklearn.linear_model", 13),
        ("app.services", 14),
        ("app.inference.engine", 18),
        ("transformers", 23),
    }
    assert expected <= found, sorted(expected - found)


def test_a_violation_is_reported_with_file_and_line(tmp_path):
    package = tmp_path / "app" / "services"
    package.mkdir(parents=True)
    (package / "fine.py").write_text('"""Fine."""\nimport json\n')
    (package / "bad.py").write_text('"""Bad."""\n\n\ndef f():\n    from ..inference import engine\n    import torch\n')
    rule = Rule("services", ("app/services/**/*.py",), (*ML, "app.inference"))
    assert violations(rule, tmp_path) == [
        "app/services/bad.py:5 imports app.inference",
        "app/services/bad.py:6 imports torch",
    ]


def test_every_module_says_what_it_is_for():
    for path in APP.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path.relative_to(APP)} has no module docstring"
