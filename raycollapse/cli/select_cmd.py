"""``raycollapse select INPUT --method greedy|threshold|random --budget B --out OUT``.

Writes the chosen row indices, in the order chosen, to OUT (``.npy``: int64 array; ``.parquet``:
columns ``rank``, ``index`` and ``id`` when the input has ids), atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.cli.common import add_overwrite_arg, config_from_args, prepare_output, print_result
from raycollapse.cli.main import add_config_args
from raycollapse.curation.entropy import kl_entropy
from raycollapse.curation.select import select
from raycollapse.data.inputs import load_features
from raycollapse.errors import UserInputError
from raycollapse.io.atomic import atomic_path
from raycollapse.neighbors.compute import Compute, resolve_compute
from raycollapse.neighbors.knn import knn_self

OUT_SUFFIXES = (".npy", ".parquet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="pick a diverse subset (greedy, threshold decay, random)",
        description="Choose B rows of INPUT by greedy farthest-point, threshold decay or random selection.",
    )
    p.add_argument(
        "input", metavar="INPUT", help=".npy, .parquet, folder of Parquet shards or of images"
    )
    p.add_argument(
        "--method", choices=["greedy", "threshold", "random"], default=None, help="select.method"
    )
    p.add_argument(
        "--budget", type=int, default=None, help="B, the number of rows to choose (select.budget)"
    )
    p.add_argument("--seed", type=int, default=None, help="select.seed")
    p.add_argument(
        "--tau0",
        type=float,
        default=None,
        help="initial threshold (select.tau0); omitted: derived from the data",
    )
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help="threshold decay per pass, in (0, 1) (select.decay)",
    )
    p.add_argument("--out", required=True, help="where to write the indices: .npy or .parquet")
    add_overwrite_arg(p)
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="Ray actors that each hold one shard of INPUT and run the selection (and the "
        "report's kNN) together (knn.shards); 1 = in-process",
    )
    p.add_argument(
        "--approximate",
        action="store_true",
        help="with --shards and greedy: greedy per shard, then over the union (faster, inexact)",
    )
    p.add_argument(
        "--cpus-per-shard",
        type=float,
        default=None,
        help="Ray CPUs per shard actor (fractions allowed); default: 1, or an equal share of "
        "the cluster's CPUs when it has fewer than --shards",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto (select.device): where greedy and threshold decay run; "
        "the same indices on every device",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        args,
        {
            "select.method": args.method,
            "select.budget": args.budget,
            "select.seed": args.seed,
            "select.tau0": args.tau0,
            "select.decay": args.decay,
            "knn.shards": args.shards,
            "select.device": args.device,
        },
    )
    sel = cfg.select
    # a device that cannot be had fails before any data is read
    compute = resolve_compute(sel.device, sel.backend)
    out = Path(args.out)
    if out.suffix not in OUT_SUFFIXES:
        raise UserInputError(f"--out '{out}' must end in .npy or .parquet.")
    prepare_output(str(out), args, inputs=(args.input,))  # exists / is the input / unwritable
    if args.approximate and cfg.knn.shards == 1:
        raise UserInputError(
            "--approximate needs --shards S > 1 (the two-round greedy is per shard)"
        )
    if args.cpus_per_shard is not None and not args.cpus_per_shard > 0:
        raise UserInputError(f"--cpus-per-shard must be > 0, got {args.cpus_per_shard:g}")
    if cfg.knn.shards != 1 and compute != Compute():
        raise UserInputError(
            f"select.device={sel.device!r} (backend {sel.backend!r}) runs in-process; with "
            "--shards the shard actors select on their CPUs: drop --device or use --shards 1"
        )
    start = time.perf_counter()
    if cfg.knn.shards != 1:  # Ray only when asked for: the default path never imports it
        from raycollapse.stages.knn_shards_cli import selection_report
        from raycollapse.stages.select_cli import select_input

        got = select_input(
            args.input,
            sel,
            cfg.knn.shards,
            approximate=args.approximate,
            cpus=args.cpus_per_shard,
        )
        seconds = time.perf_counter() - start
        chosen_by, n, d, chosen, ids = got.selection, got.n, got.d, got.chosen, got.ids
        _write_indices(out, chosen_by.indices, ids)
        min_dist, entropy = selection_report(chosen, cfg.knn)
    else:
        loaded = load_features(args.input)
        x = loaded.features
        n, d = x.shape
        if sel.budget > n:
            raise UserInputError(
                f"budget {sel.budget} is larger than the number of rows N={n}; pass --budget <= {n}."
            )
        chosen_by = select(
            x,
            sel.method,
            sel.budget,
            seed=sel.seed,
            tau0=sel.tau0,
            decay=sel.decay,
            device=compute.device,
            backend=compute.backend,
        )
        seconds = time.perf_counter() - start
        idx = chosen_by.indices
        _write_indices(out, idx, None if loaded.ids is None else loaded.ids[idx])
        chosen = x[idx]
        min_dist, entropy = _min_pairwise(chosen), _entropy_or_none(chosen, cfg.knn.k, cfg.knn.eps)
    result: dict[str, object] = {
        "n": n,
        "d": d,
        "budget": int(sel.budget),
        "method": sel.method,
        "seed": int(sel.seed),
        "device": compute.device,
        "seconds": seconds,
        **chosen_by.threshold_report(),
        "min_pairwise_distance": min_dist,
        "entropy": entropy,
        "k": int(cfg.knn.k),
        "out": str(out),
    }
    print_result(result, args.json)
    return 0


def _min_pairwise(x: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    return float(knn_self(x, 1).distances[:, 0].min())


def _entropy_or_none(x: np.ndarray, k: int, eps: float) -> float | None:
    """Entropy of the selection, or None when it has too few points for the k-th neighbour."""
    if len(x) <= k:
        return None
    return kl_entropy(x, k=k, eps=eps).entropy


def _write_indices(out: Path, idx: np.ndarray, ids: np.ndarray | None) -> None:
    """Write ``idx`` (and the chosen rows' ``ids``, aligned with it) to OUT atomically."""
    idx = np.asarray(idx, dtype=np.int64)
    with atomic_path(out) as tmp:
        if out.suffix == ".npy":
            np.save(tmp, idx)
        else:
            cols = {"rank": np.arange(len(idx), dtype=np.int64), "index": idx}
            if ids is not None:
                cols["id"] = ids
            pq.write_table(pa.table(cols), tmp)
