"""The benchmarks are run by hand, not by CI: each module must at least import and parse its
command line, so that a change elsewhere (a renamed constant) cannot break one unnoticed."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import benchmarks

APPS = {"plain_fastapi"}  # imported by uvicorn, loads the stored model at import: compiled only
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.ispkg)


def test_every_benchmark_module_is_listed():
    assert {"__main__", "replicas", "onnx", "peers", "load", *APPS} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(APPS))
def test_each_served_app_compiles(name):
    source = Path(benchmarks.__path__[0]) / f"{name}.py"
    compile(source.read_text(), str(source), "exec")


@pytest.mark.parametrize("name", [m for m in MODULES if m not in APPS])
def test_each_benchmark_imports_and_answers_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    main = getattr(module, "main", None)
    if main is None:  # a library of the others
        return
    monkeypatch.setattr(sys, "argv", [f"python -m benchmarks.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
