"""The README stays true: every setting is in its table, and its test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_once():
    documented = re.findall(r"^\| `(LORASWAP_[A-Z_]+)` \|", README, re.MULTILINE)
    expected = [f"LORASWAP_{name.upper()}" for name in Settings.model_fields]
    assert sorted(documented) == sorted(expected)


def test_ci_runs_the_readme_test_command():
    assert "make test" in README.split("##")[0]
    assert re.search(r"^make test$", (REPO / ".ci/run").read_text(), re.MULTILINE)
