"""CLI: python -m training {train,promote,import,demo} [--use-case NAME]. Batch scoring is
`python -m batch`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from configuration import UseCaseError, get_settings
from training import jobs
from training.lineage import LineageError
from training.pipeline import FLAVORS
from training.registry import CANDIDATE, CHAMPION, GateError

MOVED = ("score", "score-spark")  # batch scoring moved to `python -m batch`


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    use_case_help = "use case name (a YAML file in configuration/use_cases); default: settings"

    train = commands.add_parser("train", help="train, evaluate, log and register as candidate")
    train.add_argument("--use-case", help=use_case_help)
    train.add_argument("--data", type=Path, help="CSV/Parquet file instead of the declared source")

    promote = commands.add_parser("promote", help="move an alias through the metric gates")
    promote.add_argument("--use-case", help=use_case_help)
    promote.add_argument("--flavor", choices=[*FLAVORS, "all"], default="all")
    promote.add_argument("--from-alias", default=CANDIDATE)
    promote.add_argument("--to-alias", default=CHAMPION)

    imp = commands.add_parser("import", help="import aliased versions into the BentoML store")
    imp.add_argument("--use-case", help=use_case_help)
    imp.add_argument("--alias", help="registry alias to import (default: settings.model_alias)")

    demo = commands.add_parser("demo", help="train + promote + import, on the defaults")
    demo.add_argument("--use-case", help=use_case_help)

    for alias in MOVED:
        commands.add_parser(alias, help=f"deprecated: python -m batch {alias}", add_help=False)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:  # an alias for one release
        from batch.__main__ import main as batch_main

        print(
            f"warning: `python -m training {argv[0]}` is deprecated and will be removed; "
            f"use `python -m batch {argv[0]}`",
            file=sys.stderr,
        )
        return batch_main(argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    try:
        if args.command == "train":
            result = jobs.train(settings, args.use_case, args.data)
            print(
                json.dumps(
                    {
                        "run_id": result.run.run_id,
                        "versions": result.run.versions,
                        "metrics": result.metrics,
                    },
                    indent=2,
                )
            )
        elif args.command == "promote":
            flavors = FLAVORS if args.flavor == "all" else (args.flavor,)
            promoted = jobs.promote(
                settings, args.use_case, flavors, args.from_alias, args.to_alias
            )
            print(json.dumps({"promoted": promoted, "alias": args.to_alias}))
        else:
            models = (
                jobs.import_models(settings, args.use_case, args.alias)
                if args.command == "import"
                else jobs.demo(settings, args.use_case)
            )
            print(json.dumps({part: str(model.tag) for part, model in models.items()}))
    except (UseCaseError, GateError, LineageError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
