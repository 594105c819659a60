"""``raycollapse report RUN [RUN ...] --out DIR``: one self-contained HTML report comparing runs;
``raycollapse report SWEEP_DIR [--out DIR]``: the report of a sweep (default DIR:
``SWEEP_DIR/report``, where ``raycollapse sweep`` writes it)."""

from __future__ import annotations

import argparse

from raycollapse.cli.main import add_config_args
from raycollapse.errors import UserInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of loop runs (metric plots, sample grids, memorized pairs) or of a sweep",
        description=(
            "Write DIR/index.html (images embedded) and DIR/summary.json: every metric against "
            "iteration with one line per run, the correlation of entropy_train and "
            "generalization_score, the sample grid of each iteration, and the most memorized "
            "samples beside their nearest training image. Unfinished runs are reported as far as "
            "they got. Given a sweep's folder (it holds sweep.yaml and results.parquet), the "
            "sweep's report instead, into SWEEP_DIR/report unless --out is given."
        ),
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folder or sweep folder (path or URI)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder to write index.html into (required for runs; default SWEEP_DIR/report)",
    )
    p.add_argument(
        "--pairs", type=int, default=8, help="most memorized pairs shown per iteration (default 8)"
    )
    p.add_argument("--title", default=None, help="page title (default: the run names)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raycollapse.report import build_report
    from raycollapse.report.sweep import build_sweep_report, is_sweep

    if args.pairs < 0:
        raise UserInputError(f"--pairs must be >= 0, got {args.pairs}; pass e.g. --pairs 8.")
    # RUN takes every positional word (argparse gives nargs="+" before the overrides' "*"), so a
    # folder named like ``select.method=greedy`` (Ray Tune trial folders) is a RUN, not an override;
    # the report reads each run's own config.yaml and needs no config of its own.
    runs = [str(r) for r in args.runs]
    sweeps = [r for r in runs if is_sweep(r)]
    if sweeps:
        if len(runs) > 1:
            raise UserInputError(
                f"'{sweeps[0]}' is a sweep's folder: report one sweep alone (its trials' run "
                "folders, under trials/, can be reported together as runs)."
            )
        print(build_sweep_report(runs[0], args.out, title=args.title))
        return 0
    if args.out is None:
        raise UserInputError("--out DIR is required to report runs; pass e.g. --out runs/report.")
    print(build_report(runs, args.out, max_pairs=args.pairs, title=args.title))
    return 0
