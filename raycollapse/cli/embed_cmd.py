"""``raycollapse embed INPUT --features F --out DIR``: image pools -> Parquet shards of embeddings.

INPUT: a folder of Parquet image shards (as ``raycollapse generate`` writes them), a .parquet
file, a .npy of images (split into shards of 4096 rows, ids = row numbers) or a folder of image
files (sorted paths, ids = positions). Output: ``DIR/part-<nnnnn>.parquet`` with ``id`` and
``embedding`` columns, one per input shard; re-running resumes (complete shards are skipped).
"""

from __future__ import annotations

import argparse

from raycollapse.cli.common import add_overwrite_arg, config_from_args, prepare_output, print_result
from raycollapse.cli.main import add_config_args
from raycollapse.config.schema import FEATURE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed images with pixel / CLIP / DINOv2 / Inception features on Ray",
        description=(
            "Embed an image pool on a Ray Data actor pool: one Parquet shard of embeddings per input "
            "shard, written atomically; re-running skips complete shards. Weights: a hub tag found in "
            "the local cache, a local file (safetensors or a torch state dict), or 'none' for random "
            "weights. Nothing is downloaded."
        ),
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help="folder of Parquet image shards, .parquet, .npy of images, or image folder",
    )
    p.add_argument(
        "--features",
        default=None,
        choices=FEATURE_NAMES,
        help="feature extractor (features.name)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (local path or URI) for the embedding shards"
    )
    p.add_argument(
        "--actors", type=int, default=None, help="embedding actors (resources.embed_actors)"
    )
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor (resources.embed_gpus_per_actor)",
    )
    p.add_argument(
        "--pretrained", default=None,
        help="TAG (looked up in the local caches), FILE (.safetensors / state dict), or none (features.pretrained)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass (features.batch_size)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        args,
        {
            "features.name": args.features,
            "features.pretrained": args.pretrained,
            "features.batch_size": args.batch_size,
            "resources.embed_actors": args.actors,
            "resources.embed_gpus_per_actor": args.gpus_per_actor,
        },
    )
    from raycollapse.config import to_dict
    from raycollapse.io.outputs import fingerprint, output_guard, write_signature

    # The input's content is part of the work: an output made from other images is not resumed.
    sig = {"input": fingerprint(args.input), "features": to_dict(cfg.features)}
    sig["features"].pop("batch_size", None)
    prepare_output(args.out, args, inputs=(args.input,), signature=sig)
    # Imported here: `raycollapse --help` and the other commands need not import Ray and torch.
    from raycollapse.stages.embed import embed_pool

    with output_guard(args.out):
        write_signature(args.out, sig)  # first: an interrupted run is resumed by the same command
        result = embed_pool(
            args.input,
            args.out,
            cfg.features,
            actors=cfg.resources.embed_actors,
            gpus_per_actor=cfg.resources.embed_gpus_per_actor,
            cpus_per_actor=cfg.resources.cpus_per_actor,
        )
    if not args.json:
        result.pop("node_ids", None)  # one line per node is noise in the human-readable output
    print_result(result, args.json)
    return 0
