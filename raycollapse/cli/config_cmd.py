"""``raycollapse config CONFIG [key=value ...]``: the resolved config tree as YAML.

Every key of every section, defaults filled in, overrides applied: exactly what a run of CONFIG
would use (and save as ``config.yaml``). Types and names are checked as the config loads; the
value checks of a command run when that command does (``raycollapse run CONFIG --dry-run``).
"""

from __future__ import annotations

import argparse

from raycollapse.config import load_config, to_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved config (every key, defaults filled in) as YAML",
        description="Print CONFIG merged over the defaults, with the key=value overrides applied.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. knn.k=1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, list(args.overrides))), end="")
    return 0
