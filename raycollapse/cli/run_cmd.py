"""``raycollapse run CONFIG [key=value ...]``: the self-consuming loop, resumable."""

from __future__ import annotations

import argparse

from raycollapse.cli.common import config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run (or resume) the recursive self-consuming loop",
        description=(
            "Run the loop of CONFIG on the current Ray cluster (a local one when none is running). "
            "Re-running the same command resumes at the first unfinished stage."
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", default=[], help="key=value overrides, e.g. loop.iterations=2"
    )
    p.add_argument(
        "--fork",
        action="store_true",
        help="the run exists with another config: start a new run beside it",
    )
    p.add_argument(
        "--until", default=None, metavar="ITER:STAGE", help="stop after this stage, e.g. 1:generate"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raycollapse.loop.runner import run_loop

    cfg = config_from_args(args)  # checks every section before Ray or any data
    path = run_loop(cfg, fork=args.fork, until=args.until)
    print(path)
    return 0
