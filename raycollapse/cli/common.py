"""Helpers shared by the sub-commands: config loading from parsed args, JSON output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from omegaconf import DictConfig

from raycollapse.config import apply_overrides, load_config
from raycollapse.config.checks import check_command


def config_from_args(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> DictConfig:
    """``--config`` file, then ``key=value`` overrides, then flag shorthands (``{"knn.k": args.k}``).

    Then the checks of every section ``args.command`` reads (``config.checks.check_command``), so
    a bad value fails before the command reads any data.
    """
    cfg = apply_overrides(load_config(args.config, list(args.overrides)), flags or {})
    check_command(cfg, args.command)
    return cfg


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """One JSON object on stdout with ``--json``; otherwise aligned ``key: value`` lines."""
    if as_json:
        print(json.dumps(_clean(result), sort_keys=False))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}", file=sys.stdout)


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an existing output (refused without it)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (by default an existing output is refused)",
    )


def prepare_output(
    out: str,
    args: argparse.Namespace,
    *,
    inputs: tuple[str | None, ...] = (),
    signature: dict[str, Any] | None = None,
) -> bool:
    """Check ``out`` before any work (``io.outputs.check_output``); with ``--overwrite`` and an
    output folder that is not resumed, remove the old one now (a file is replaced atomically
    when the new one is written). True when the command resumes ``out``."""
    from raycollapse.io import storage
    from raycollapse.io.outputs import check_output, clear_output

    overwrite = bool(getattr(args, "overwrite", False))
    resume = check_output(out, inputs=inputs, overwrite=overwrite, resume_signature=signature)
    if overwrite and not resume and storage.is_dir(out):
        clear_output(out)
    return resume
