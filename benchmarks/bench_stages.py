"""Generation and training stages on Ray: images/s with 1 and 2 actors / workers.

- ``generate_pool``: a ``tiny`` UNet on 8 x 8 digits-sized images (random weights: sampling costs
  the same as with trained ones), DDIM with ``--steps`` steps, ``--n`` samples in shards of
  ``--shard-size``, PNG-encoded and written to Parquet. Wall time of the Ray part, actor
  start-up (process start, torch import, checkpoint load) included.
- ``train_distributed``: the ``tiny`` preset on the scikit-learn digits (all 1,797), global batch
  ``--batch-size``, ``--train-steps`` steps, Ray Train ``TorchTrainer`` with 1 and 2 CPU workers
  (1 CPU and 1 torch thread each). images/s of the training loop (rank 0's timer, after data
  loading and DDP set-up), and the driver's wall time including Ray Train start-up.

Usage::

    python benchmarks/bench_stages.py [--quick] [--readme] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from readme_section import update_readme

HERE = Path(__file__).resolve().parent
SECTION = "## Generation and training stages"


def make_checkpoint(folder: Path) -> str:
    """A tiny unconditional UNet for 8 x 8 grayscale images, random weights."""
    from raycollapse.diffusion.checkpoint import save_checkpoint
    from raycollapse.diffusion.sampling import make_scheduler
    from raycollapse.diffusion.unet import build_unet

    unet = build_unet("tiny", resolution=8, channels=1, seed=0)
    meta = {
        "preset": "tiny",
        "resolution": 8,
        "channels": 1,
        "class_conditional": False,
        "num_classes": 10,
    }
    return save_checkpoint(folder / "ckpt", unet, make_scheduler(), meta)


def bench_generate(tmp: Path, actors: list[int], n: int, steps: int, shard_size: int) -> list[dict]:
    from raycollapse.stages.generate import generate_pool

    ckpt = make_checkpoint(tmp)
    sample = {"sampler": "ddim", "steps": steps, "eta": 0.5, "group_size": 64}
    runs = []
    for a in actors:
        m = generate_pool(ckpt, tmp / f"pool{a}", n, seed=0, sample_cfg=sample, actors=a, shard_size=shard_size)  # fmt: skip
        run = {k: m[k] for k in ("actors", "rows", "shards", "seconds", "images_per_second")}
        # per actor, while busy: rows / (shard seconds / actors); start-up excluded
        run["busy_images_per_second_per_actor"] = m["rows"] / max(m["shard_seconds"], 1e-9)
        run["load_after"] = os.getloadavg()[0]
        runs.append(run)
        print(
            f"[bench] generate actors={a}: {m['images_per_second']:.1f} images/s", file=sys.stderr
        )
    return runs


def bench_train(tmp: Path, workers: list[int], steps: int, batch_size: int) -> list[dict]:
    from raycollapse.config import load_config
    from raycollapse.data.sources import load_records
    from raycollapse.stages.train import train_distributed

    runs = []
    for w in workers:
        cfg = load_config(overrides=[
            f"train.workers={w}", f"train.steps={steps}", f"train.batch_size={batch_size}",
            "train.checkpoint_every=0", "train.warmup_steps=10",
        ])  # fmt: skip
        records = load_records(cfg.data)
        t0 = time.perf_counter()
        m = train_distributed(cfg, records, tmp / f"ckpt{w}", storage_path=tmp / "ray", run_name=f"w{w}")  # fmt: skip
        runs.append({
            "workers": w, "images": len(records), "steps": m["steps"], "batch_size": m["batch_size"],
            "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"],
            "wall_seconds": time.perf_counter() - t0, "loss_last": m["loss_last"],
            "load_after": os.getloadavg()[0],
        })  # fmt: skip
        print(f"[bench] train workers={w}: {m['images_per_second']:.1f} images/s", file=sys.stderr)
    return runs


def machine() -> str:
    # the load average says how much of the (shared) CPUs other processes had during the run
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load:.1f} at start), "
        f"torch {torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}"
    )


def readme_section(res: dict[str, Any]) -> str:
    """The ``## Generation and training stages`` section of benchmarks/README.md."""
    g, t = res["generate"], res["train"]
    lines = [
        SECTION,
        "",
        f"`{res['command']}` on {res['machine']}. CPU only, `tiny` preset, 8 x 8 x 1 images.",
        "",
        f"`generate_pool` (DDIM {g['steps']} steps, eta 0.5, {g['n']} samples in shards of "
        f"{g['shard_size']}, PNG + Parquet written atomically); wall time of the Ray part, actor "
        "start-up included:",
        "",
        "| actors | images | shards | seconds | images/s | busy images/s per actor | load after |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in g["runs"]:
        lines.append(
            f"| {r['actors']} | {r['rows']} | {r['shards']} | {r['seconds']:.1f} | {r['images_per_second']:,.1f} "
            f"| {r['busy_images_per_second_per_actor']:,.1f} | {r['load_after']:.1f} |"
        )
    lines += [
        "",
        f"`train_distributed` (Ray Train `TorchTrainer`, DDP over gloo, {t['steps']} steps, global batch "
        f"{t['batch_size']} split over the workers, 1 CPU and 1 torch thread per worker, on all "
        "1,797 digits); images/s of the training loop, and the driver's wall time with Ray Train "
        "start-up and the final checkpoint:",
        "",
        "| workers | steps | batch | loop seconds | images/s | wall seconds | load after |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in t["runs"]:
        lines.append(
            f"| {r['workers']} | {r['steps']} | {r['batch_size']} | {r['train_seconds']:.1f} | "
            f"{r['images_per_second']:,.1f} | {r['wall_seconds']:.1f} | {r['load_after']:.1f} |"
        )
    lines += [
        "",
        "Reading: each actor or worker is one process with one torch thread, so on 2 cores the",
        "second one can at best double the rate, and only when nothing else runs: the 1-minute load",
        "average (at start, and after each run) says how many processes shared the 2 cores; above",
        "about 2 the second actor or worker only competes for a core and the numbers measure the",
        "contention, not the stage. 'busy images/s per actor' excludes actor start-up (process start,",
        "torch import, checkpoint load: 5-15 s here). Generation shards are independent, so actors",
        "scale until the cores (or GPUs) run out. DDP workers step in lockstep (one gradient",
        "all-reduce of the 1.1 M parameters per step over gloo), so one descheduled worker stalls",
        "both: training suffers most from a shared machine; larger presets and GPUs amortise it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--n", type=int, default=1024, help="samples per generation run")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="global training batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--readme", action="store_true", help="write the section of benchmarks/README.md"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.train_steps = (
            min(args.n, 256),
            min(args.steps, 10),
            min(args.train_steps, 30),
        )

    res: dict[str, Any] = {
        "command": "python benchmarks/bench_stages.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_stages_"))
    # address="local": never attach to another Ray that happens to run on this machine
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        res["generate"] = {
            "n": args.n, "steps": args.steps, "shard_size": args.shard_size,
            "runs": bench_generate(tmp, args.actors, args.n, args.steps, args.shard_size),
        }  # fmt: skip
        res["train"] = {
            "steps": args.train_steps, "batch_size": args.batch_size,
            "runs": bench_train(tmp, args.workers, args.train_steps, args.batch_size),
        }  # fmt: skip
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.readme:
        update_readme(HERE / "README.md", SECTION, readme_section(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
