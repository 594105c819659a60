"""``raycollapse entropy INPUT [--k K] [--json]``: Kozachenko-Leonenko entropy of a feature set."""

from __future__ import annotations

import argparse
import time

from raycollapse.cli.common import config_from_args, print_result
from raycollapse.cli.main import add_config_args
from raycollapse.curation.entropy import kl_entropy
from raycollapse.data.inputs import load_features
from raycollapse.errors import UserInputError
from raycollapse.neighbors.compute import Compute, resolve_compute


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "entropy",
        help="KL entropy of embeddings or images",
        description="Kozachenko-Leonenko entropy (nats) of a .npy, Parquet or image-folder INPUT.",
    )
    p.add_argument(
        "input", metavar="INPUT", help=".npy, .parquet, folder of Parquet shards or of images"
    )
    p.add_argument("--k", type=int, default=None, help="k-th neighbour (shorthand for knn.k)")
    p.add_argument(
        "--bootstrap", type=int, default=None, help="bootstrap replicates for a CI (knn.bootstrap)"
    )
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="kNN index shards, one Ray actor each (knn.shards); 1 = in-process, no Ray",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto (knn.device): where the kNN runs; the same result",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        args,
        {
            "knn.k": args.k,
            "knn.bootstrap": args.bootstrap,
            "knn.shards": args.shards,
            "knn.device": args.device,
        },
    )
    # a device that cannot be had fails before any data is read
    compute = resolve_compute(cfg.knn.device, cfg.knn.backend)
    if cfg.knn.shards != 1 and compute != Compute():
        raise UserInputError(
            f"knn.device={cfg.knn.device!r} (backend {cfg.knn.backend!r}) runs in-process; "
            "with --shards the shard actors search on their CPUs: drop --device or use --shards 1"
        )
    start = time.perf_counter()
    if cfg.knn.shards != 1:
        # Imported here so that the default in-process path never imports Ray.
        from raycollapse.stages.knn_shards_cli import entropy_of_input

        result, kind = entropy_of_input(args.input, cfg.knn, seed=cfg.seed)
    else:
        loaded = load_features(args.input)
        kind = loaded.kind
        result = kl_entropy(
            loaded.features,
            k=cfg.knn.k,
            eps=cfg.knn.eps,
            bootstrap=cfg.knn.bootstrap,
            seed=cfg.seed,
            batch_size=cfg.knn.batch_size,
            device=compute.device,
            backend=compute.backend,
        )
    out = {
        **result.to_dict(),
        "features": kind,
        "shards": int(cfg.knn.shards),
        "device": compute.device,
        "seconds": time.perf_counter() - start,
    }
    print_result(out, args.json)
    return 0
