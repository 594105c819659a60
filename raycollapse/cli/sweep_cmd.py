"""``raycollapse sweep SWEEP_CONFIG [key=value ...]``: a Ray Tune sweep over loop configs.

Prints progress on stderr and, last, one JSON line on stdout: ``trials``, ``finished``,
``stopped_early``, ``errored``, ``best_trial``, ``best_value``, ``best_config`` (its swept
values), ``results`` (the Parquet table; a CSV beside it), ``best`` (``best.yaml``, the best
trial's full loop config) and ``report`` (``<storage>/report/index.html``, the sweep report; its
``summary.json`` beside it). Re-running the same command resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from raycollapse.cli.common import print_result
from raycollapse.errors import UserInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="sweep loop or selection settings with Ray Tune (resumable)",
        description=(
            "Run the trials of SWEEP_CONFIG (configs/sweeps/) on the current Ray cluster. "
            "key=value overrides the sweep config; base.KEY=value the base loop config. "
            "Re-running the same command resumes the sweep."
        ),
    )
    _arguments(p)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="SWEEP_CONFIG", help="sweep YAML file (see configs/sweeps/)")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="key=value, e.g. num_samples=4 base.loop.iterations=2",
    )
    p.set_defaults(func=run)


def load_pool(sweep) -> np.ndarray:
    """The select trials' pool: the ``pool`` embeddings, or the pixels of the base ``data``."""
    from raycollapse.data.inputs import images_to_pixels, load_features
    from raycollapse.data.sources import load_records

    if sweep.cfg.pool is not None:
        return load_features(sweep.cfg.pool).features
    if sweep.base.features.name != "pixel":
        raise UserInputError(
            f"pool: null selects on the pixels of the base data, but features.name="
            f"{sweep.base.features.name}; set pool to an embeddings file or folder."
        )
    return images_to_pixels(load_records(sweep.base.data).images)


def run(args: argparse.Namespace) -> int:
    from raycollapse.sweeps.config import check_sweep, load_sweep

    sweep = load_sweep(args.config, list(args.overrides))
    pool = load_pool(sweep) if sweep.cfg.kind == "select" else None
    configs = check_sweep(sweep, None if pool is None else len(pool))
    from raycollapse.stages.runtime import ensure_ray
    from raycollapse.sweeps.tuner import run_sweep

    ensure_ray()
    print(f"[sweep] {sweep.cfg.kind} trials, results in {sweep.storage}", file=sys.stderr)
    summary = run_sweep(sweep, configs, pool)
    print_result(summary, as_json=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command on its own (``python -m raycollapse.cli.sweep_cmd``): exit status 2 with the
    message for a user error, as ``raycollapse sweep``."""
    p = argparse.ArgumentParser(prog="raycollapse sweep")
    _arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserInputError as exc:
        print(f"raycollapse sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
