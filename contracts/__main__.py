"""`python -m contracts [--write]`: check (or record) the contract of every use case."""

from __future__ import annotations

import argparse
import json
import sys

from configuration import get_settings, load_use_case
from contracts import current, differences, dump, path_for


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts", description=__doc__)
    parser.add_argument("--write", action="store_true", help="record new contract versions")
    args = parser.parse_args()
    settings = get_settings()
    failed = False
    for use_case_file in sorted(settings.use_case_dir.glob("*.yaml")):
        use_case = load_use_case(use_case_file)
        path = path_for(use_case.name, use_case.contract_version)
        now = current(use_case.name, settings.use_case_dir)
        if path.is_file():
            changed = differences(json.loads(path.read_text()), now)
            if changed:
                failed = True
                print(
                    f"{use_case.name}: the contract differs from {path} (contract_version "
                    f"{use_case.contract_version}) at:\n  " + "\n  ".join(changed[:20]) + "\n"
                    f"Bump contract_version in {use_case_file.name}, then run "
                    "`python -m contracts --write`.",
                    file=sys.stderr,
                )
            else:
                print(f"{use_case.name}: v{use_case.contract_version} matches {path}")
        elif args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump(now))
            print(f"{use_case.name}: recorded v{use_case.contract_version} in {path}")
        else:
            failed = True
            print(
                f"{use_case.name}: no recorded contract {path}: run with --write", file=sys.stderr
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
