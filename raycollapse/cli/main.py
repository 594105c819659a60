"""The ``raycollapse`` command: one sub-command per module, user errors printed without traceback
(``--debug``, anywhere on the line, prints it too); Ctrl-C prints "interrupted" and exits 130."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from raycollapse.errors import UserInputError

# Each module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Imported lazily so that
# ``raycollapse entropy`` does not pay for importing Ray or diffusers.
COMMANDS: dict[str, str] = {
    "entropy": "raycollapse.cli.entropy_cmd",
    "select": "raycollapse.cli.select_cmd",
    "train": "raycollapse.cli.train_cmd",
    "generate": "raycollapse.cli.generate_cmd",
    "embed": "raycollapse.cli.embed_cmd",
    "run": "raycollapse.cli.run_cmd",
    "report": "raycollapse.cli.report_cmd",
    "sweep": "raycollapse.cli.sweep_cmd",
    "config": "raycollapse.cli.config_cmd",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every command shares: ``--config FILE`` and trailing ``key=value`` overrides."""
    parser.add_argument("--config", default=None, help="YAML config file merged over the defaults")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="key=value config overrides, e.g. knn.k=5"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycollapse",
        description="Model collapse in diffusion models, and diversity-driven data curation, on Ray.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (any position)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # command not available in this build
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # argparse stops filling the trailing ``key=value`` positionals at the first flag, so
    # overrides written after flags arrive as unknown arguments: take those back.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except UserInputError as exc:
        if debug:
            traceback.print_exc()
        print(f"raycollapse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(
            f"raycollapse {args.command}: interrupted; re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
