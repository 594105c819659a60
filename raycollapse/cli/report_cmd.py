"""``raycollapse report RUN [RUN ...] --out DIR``: one self-contained HTML report comparing runs."""

from __future__ import annotations

import argparse

from raycollapse.cli.main import add_config_args
from raycollapse.errors import UserInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of loop runs: metric plots, sample grids, memorized pairs",
        description=(
            "Write DIR/index.html (images embedded): every metric against iteration with one line "
            "per run, the sample grid of each iteration, and the most memorized samples beside "
            "their nearest training image. Unfinished runs are reported as far as they got."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (local path or URI)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write index.html into")
    p.add_argument(
        "--pairs", type=int, default=8, help="most memorized pairs shown per iteration (default 8)"
    )
    p.add_argument("--title", default=None, help="page title (default: the run names)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raycollapse.report import build_report

    if args.pairs < 0:
        raise UserInputError(f"--pairs must be >= 0, got {args.pairs}; pass e.g. --pairs 8.")
    # RUN takes every positional word (argparse gives nargs="+" before the overrides' "*"), so a
    # folder named like ``select.method=greedy`` (Ray Tune trial folders) is a RUN, not an override;
    # the report reads each run's own config.yaml and needs no config of its own.
    print(build_report(list(args.runs), args.out, max_pairs=args.pairs, title=args.title))
    return 0
