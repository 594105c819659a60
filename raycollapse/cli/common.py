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
