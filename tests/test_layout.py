"""The house rules that keep the folders true: a folder says which process runs its code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def imported_packages(folder: str) -> dict[str, set[str]]:
    """{file: top-level packages it imports} for every module of `folder`."""
    found = {}
    for path in sorted((PROJECT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(PROJECT))] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("training", {"api", "service"}),
        ("batch", {"api", "service"}),
        ("configuration", {"api", "runners", "training", "batch", "service"}),
        ("runners", {"api", "training", "batch", "service"}),
    ],
)
def test_a_folder_imports_nothing_of_the_processes_above_it(folder, forbidden):
    wrong = {
        f: sorted(p & forbidden) for f, p in imported_packages(folder).items() if p & forbidden
    }
    assert not wrong, wrong


def test_every_setting_has_a_description():
    from configuration.settings import Settings

    assert [n for n, f in Settings.model_fields.items() if not f.description] == []
