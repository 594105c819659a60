"""Embedding throughput: images/s per extractor (random weights), and the Ray pipeline for pixels.

Two measurements on 32 x 32 RGB images (the paper's resolution):

- ``extractor``: ``build_extractor(name, "none")`` called in this process on batches of
  ``--batch-size`` images (after one warm-up batch): the model's own speed on this machine,
  pre-processing (resize to 224 / 299) included. Random weights cost the same as trained ones.
- ``embed_pool``: the whole stage for ``pixel`` on a Parquet pool of PNG shards (``--shards`` x
  ``--rows``) with 1 and 2 actors: reading, PNG decoding, embedding and writing the output
  shards atomically, actor start-up included (wall time of the Ray part).

Usage::

    python benchmarks/bench_embed.py [--quick] [--readme] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from readme_section import update_readme

from raycollapse.features.extractors import build_extractor

HERE = Path(__file__).resolve().parent
SECTION = "## Embedding"
# images timed per extractor (full / --quick): enough for a stable rate, small enough for 2 CPUs
COUNTS = {"pixel": (100_000, 20_000), "clip": (128, 32), "dinov2": (128, 32), "inception": (64, 16)}


def bench_extractor(name: str, n: int, batch_size: int, size: int = 32) -> dict[str, Any]:
    """images/s of one extractor in this process (random weights, CPU)."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    ext = build_extractor(name, "none")
    build_s = time.perf_counter() - t0
    ext(images[:batch_size])  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        out = ext(images[lo : lo + batch_size])
    seconds = time.perf_counter() - t0
    return {
        "extractor": name,
        "dim": int(out.shape[1]),
        "input": ext.input_size or size,
        "images": n,
        "seconds": seconds,
        "images_per_second": n / seconds,
        "build_seconds": build_s,
    }


def write_pool(folder: Path, shards: int, rows: int, size: int = 32) -> None:
    """A pool like the generation stage writes: id, image (PNG bytes), label."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(shards):
        pngs = []
        for im in rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        ids = np.arange(s * rows, (s + 1) * rows)
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "image": pa.array(pngs, pa.binary()),
                "label": pa.array(ids % 10),
            }
        )
        pq.write_table(table, folder / f"part-{s:05d}.parquet")


def bench_pool(actors: list[int], shards: int, rows: int, batch_size: int) -> list[dict[str, Any]]:
    """embed_pool(pixel) with each actor count, on a fresh local Ray with this machine's CPUs."""
    import ray

    from raycollapse.stages.embed import embed_pool

    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        write_pool(tmp / "pool", shards, rows)
        # address="local": a fresh Ray of our own, never someone else's cluster on this machine
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False
        )
        out = []
        for a in actors:
            res = embed_pool(
                tmp / "pool", tmp / f"out{a}", {"name": "pixel", "batch_size": batch_size}, actors=a
            )
            run = {k: res[k] for k in ("actors", "rows", "shards", "images_per_second", "nodes")}
            run["seconds"] = res["rows_embedded"] / res["images_per_second"]  # the Ray part only
            out.append(run)
        return out
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def machine() -> str:
    # the load average says how much of the (shared) CPUs other processes had during the run
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load:.1f} at start), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def readme_section(res: dict[str, Any]) -> str:
    """The ``## Embedding`` section of benchmarks/README.md for these results."""
    lines = [
        SECTION,
        "",
        f"`{res['command']}` on {res['machine']}. Random weights (`--pretrained none`: same",
        "architectures and cost as the trained ones), 32 x 32 RGB inputs, CPU only.",
        "",
        "Per extractor, in one process (`build_extractor(name, 'none')`, batches of "
        f"{res['batch_size']}, after a warm-up batch; resize to the model's input included):",
        "",
        "| extractor | dim | model input | images | images/s | build s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["extractors"]:
        lines.append(
            f"| {r['extractor']} | {r['dim']} | {r['input']} | {r['images']} | {r['images_per_second']:,.1f} | {r['build_seconds']:.1f} |"
        )
    lines += [
        "",
        f"`embed_pool` (the Ray stage) for `pixel` on {res['pool']['shards']} Parquet shards x "
        f"{res['pool']['rows']} PNG images: read, decode, embed, write each output shard atomically; "
        "wall time of the Ray part, actor start-up included:",
        "",
        "| actors | images | seconds | images/s |",
        "|---:|---:|---:|---:|",
    ]
    for r in res["pool"]["runs"]:
        lines.append(
            f"| {r['actors']} | {r['rows']} | {r['seconds']:.1f} | {r['images_per_second']:,.0f} |"
        )
    lines += [
        "",
        "Reading: on CPU the model extractors are bound by the forward pass at 224/299 px (a 32 px",
        "image costs as much as a 224 px one after the resize); the pixel stage is bound by PNG",
        "decoding and Parquet I/O, so a second actor helps as far as free cores allow. On a GPU",
        "cluster give each actor `resources.embed_gpus_per_actor` and a larger `features.batch_size`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--extractors", nargs="+", default=list(COUNTS), choices=list(COUNTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", type=int, default=8, help="pool shards for the embed_pool run")
    parser.add_argument("--rows", type=int, default=2048, help="images per pool shard")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--readme", action="store_true", help="write the section of benchmarks/README.md"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.rows = min(args.shards, 4), min(args.rows, 512)

    res: dict[str, Any] = {
        "command": "python benchmarks/bench_embed.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "batch_size": args.batch_size,
        "extractors": [],
    }
    for name in args.extractors:
        n = COUNTS[name][1 if args.quick else 0]
        r = bench_extractor(name, n, args.batch_size)
        print(
            f"{name:10s} dim {r['dim']:5d}  {r['images_per_second']:10,.1f} images/s  ({n} images, {r['seconds']:.1f}s)",
            flush=True,
        )
        res["extractors"].append(r)
    runs = bench_pool(args.actors, args.shards, args.rows, batch_size=256)
    res["pool"] = {"shards": args.shards, "rows": args.rows, "runs": runs}
    for r in runs:
        print(
            f"embed_pool pixel, {r['actors']} actor(s): {r['images_per_second']:,.0f} images/s ({r['rows']} images, {r['seconds']:.1f}s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.readme:
        update_readme(HERE / "README.md", SECTION, readme_section(res))
        print(f"updated {HERE / 'README.md'} ({SECTION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
