"""The HTTP contract, committed: the JSON schema of every route's request and responses, one
file per use case and contract version (`contracts/<use case>/v<N>.json`).

`python -m contracts` checks the service against the committed files; `python -m contracts
--write` records the schema of a new contract version. It never overwrites a version that is
already recorded: a change to the contract needs a bump of `contract_version` in the use case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CONTRACTS_DIR = Path(__file__).resolve().parent
PROJECT = CONTRACTS_DIR.parent
REF = "#/components/schemas/"


def path_for(use_case: str, version: int) -> Path:
    return CONTRACTS_DIR / use_case / f"v{version}.json"


def snapshot_of(spec: dict[str, Any], prefix: str, use_case: str, version: int) -> dict[str, Any]:
    """The routes under `prefix` of an OpenAPI document, with every schema they reference."""
    paths = {p: spec["paths"][p] for p in sorted(spec["paths"]) if p.startswith(prefix)}
    schemas = spec.get("components", {}).get("schemas", {})
    wanted: dict[str, Any] = {}
    pending = _refs(paths)
    while pending:
        name = pending.pop()
        if name not in wanted and name in schemas:
            wanted[name] = schemas[name]
            pending |= _refs(schemas[name])
    return {
        "use_case": use_case,
        "contract_version": version,
        "paths": paths,
        "schemas": dict(sorted(wanted.items())),
    }


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(REF):
                found.add(value[len(REF) :])
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def current(use_case: str, use_case_dir: Path | None = None) -> dict[str, Any]:
    """The contract the code defines now for `use_case`, with default settings (a fresh
    interpreter: the service binds its use case at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")}
    env["SCORING_USE_CASE"] = use_case
    if use_case_dir is not None:
        env["SCORING_USE_CASE_DIR"] = str(use_case_dir)
    result = subprocess.run(
        [sys.executable, "-m", "contracts.snapshot"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"contract snapshot of {use_case} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout))


def dump(contract: dict[str, Any]) -> str:
    return json.dumps(contract, indent=1, sort_keys=True) + "\n"


def differences(recorded: dict[str, Any], now: dict[str, Any], where: str = "") -> list[str]:
    """Where two contracts differ, as JSON paths (at most a few per branch)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(recorded) | set(now)):
            if key not in now:
                out.append(f"{where}/{key}: removed")
            elif key not in recorded:
                out.append(f"{where}/{key}: added")
            else:
                out += differences(recorded[key], now[key], f"{where}/{key}")
        return out
    return [] if recorded == now else [f"{where}: changed"]
