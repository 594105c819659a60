"""DDPM benchmark: training throughput, sampling cost, and DDIM vs DDPM sample quality on digits.

1. Training throughput (images/s) of ``tiny`` (8x8x1) and ``unet32`` (32x32x3), batch 64,
   fp32 on this CPU, measured over steps after a warm-up.
2. Sampling seconds per image for DDIM-50 and DDPM-1000 (network batches of ``group_size`` 64).
   ``tiny``: both measured. ``unet32``: DDIM-50 measured, DDPM-1000 = 20 x that (the cost is the
   network forward per step; the scheduler step is < 1 %, see the tiny rows).
3. Fréchet distance in pixel space (pixel features, ``metrics.distribution.frechet_distance``)
   between ``--fd-n`` samples of ONE trained tiny model and all 1,797 real digits, for DDIM with
   10/25/50/100 steps (eta 0, 0.5, 1) and DDPM-1000; the floor is FD(``--fd-n`` random real
   digits, all digits).

Usage::

    python benchmarks/bench_ddpm.py [--threads 1] [--checkpoint runs/train_tiny_digits/checkpoint]
        [--fd-n 512] [--quick] [--out benchmarks/results/ddpm.json]

Without ``--checkpoint`` a tiny model is trained here with ``configs/train_tiny_digits.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raycollapse.config import load_config
from raycollapse.data.inputs import images_to_pixels as pixel_features
from raycollapse.data.sources import load_records
from raycollapse.diffusion.checkpoint import load_checkpoint
from raycollapse.diffusion.sampling import images_to_tensor, make_scheduler, sample_images
from raycollapse.diffusion.trainer import (
    EMA,
    make_lr_schedule,
    make_optimizer,
    train_loop,
    train_step,
)
from raycollapse.diffusion.unet import build_unet, count_parameters
from raycollapse.metrics.distribution import frechet_distance

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[bench_ddpm] {msg}", file=sys.stderr, flush=True)


def train_throughput(preset: str, resolution: int, channels: int, batch: int, steps: int) -> dict:
    model = build_unet(preset, resolution=resolution, channels=channels, seed=0)
    sched = make_scheduler()
    opt = make_optimizer(model, 1e-4)
    lr = make_lr_schedule(opt, 10, 1000)
    ema = EMA(model, 0.999)
    gen = torch.Generator().manual_seed(0)
    x = images_to_tensor(
        np.random.default_rng(0).integers(
            0, 256, (batch, resolution, resolution, channels), dtype=np.uint8
        )
    )
    kw = dict(noise_scheduler=sched, optimizer=opt, lr_schedule=lr, ema=ema, generator=gen)
    for _ in range(2):  # warm-up (allocator, oneDNN primitive cache)
        train_step(model, x, None, **kw)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, x, None, **kw)
    sec = time.perf_counter() - start
    return {
        "preset": preset, "resolution": resolution, "channels": channels, "batch": batch,
        "parameters": count_parameters(model), "steps": steps,
        "steps_per_second": steps / sec, "images_per_second": steps * batch / sec,
    }  # fmt: skip


def train_rows(q: bool) -> list[dict]:
    return [
        train_throughput("tiny", 8, 1, 64, 5 if q else 40),
        train_throughput("tiny", 16, 1, 64, 3 if q else 20),
        train_throughput("unet32", 32, 3, 64, 1 if q else 5),
    ]


def sampling_cost(model, sched, sampler: str, steps: int, n: int) -> dict:
    sample_images(model, sched, range(64), seed=0, sampler="ddim", steps=2)  # warm-up
    start = time.perf_counter()
    sample_images(model, sched, range(n), seed=0, sampler=sampler, steps=steps, group_size=64)
    sec = time.perf_counter() - start
    return {
        "sampler": sampler,
        "steps": 1000 if sampler == "ddpm" else steps,
        "images": n,
        "seconds": sec,
        "seconds_per_image": sec / n,
    }


def _run_spec(text: str) -> tuple[str, int, float]:
    """``SAMPLER-STEPS-ETA`` (``ddim-50-0.5``) as ``(sampler, steps, eta)``."""
    sampler, steps, eta = text.strip().split("-")
    return sampler, int(steps), float(eta)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--checkpoint", default=None, help="a trained tiny digits checkpoint (else train one)"
    )
    ap.add_argument("--fd-n", type=int, default=512)
    ap.add_argument(
        "--fd-seeds", default="1", help="comma-separated pool seeds of the FD part (mean over them)"
    )
    ap.add_argument(
        "--fd-runs",
        default=None,
        help="samplers of the FD part as SAMPLER-STEPS-ETA, comma-separated (e.g. ddim-50-0.5,"
        "ddpm-1000-0); default: the table in benchmarks/README.md",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument(
        "--parts", default="train,sample,fd", help="comma-separated subset of train,sample,fd"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddpm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    result: dict = {
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "load_average_start": os.getloadavg(),
        },
    }  # fmt: skip

    parts = set(args.parts.split(","))
    if "train" in parts:
        log("training throughput")
        result["train"] = train_rows(q)

    cfg = load_config(ROOT / "configs" / "train_tiny_digits.yaml", ["train.steps=20"] if q else [])
    real = load_records(cfg.data).images
    if args.checkpoint:
        ckpt = load_checkpoint(
            args.checkpoint, expect={"preset": "tiny", "resolution": 8, "channels": 1}
        )
        model, sched, train_info = (
            ckpt.unet,
            ckpt.scheduler,
            {"checkpoint": args.checkpoint, "steps": ckpt.meta.get("steps")},
        )
    else:
        log(f"training a tiny model ({cfg.train.steps} steps)")
        model = build_unet("tiny", resolution=8, channels=1, seed=cfg.model.seed)
        sched = make_scheduler()
        t = cfg.train
        ema, res = train_loop(
            model, real, None, noise_scheduler=sched, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
            warmup_steps=t.warmup_steps, ema_decay=t.ema_decay, grad_clip=t.grad_clip, seed=t.seed,
        )  # fmt: skip
        ema.copy_to(model)
        train_info = {"steps": t.steps, "seconds": res.seconds, "loss_last": res.loss_last}
    model.eval()
    result["fd_model"] = train_info

    if "sample" in parts:
        log("sampling cost")
        n_fast, n_slow = (8, 2) if q else (256, 64)
        result["sample"] = [
            {"preset": "tiny", **sampling_cost(model, sched, "ddim", 50, n_fast)},
            {"preset": "tiny", **sampling_cost(model, sched, "ddpm", 1000, n_slow)},
        ]
        u32 = build_unet("unet32", resolution=32, channels=3, seed=0).eval()
        ddim32 = sampling_cost(u32, make_scheduler(), "ddim", 50, 8 if q else 64)
        result["sample"] += [
            {"preset": "unet32", **ddim32},
            {"preset": "unet32", "sampler": "ddpm", "steps": 1000, "estimated": True,
             "seconds_per_image": ddim32["seconds_per_image"] * 20},
        ]  # fmt: skip

    if "fd" in parts:
        log("Fréchet distance, pixel features, vs all real digits")
        real_f = pixel_features(real)
        n = 16 if q else args.fd_n
        rng = np.random.default_rng(0)
        fd = [
            {
                "set": f"real subset ({n})",
                "fd": frechet_distance(real_f[rng.choice(len(real), n, replace=False)], real_f),
            }
        ]
        runs = [("ddim", k, 0.0) for k in (10, 25, 50, 100)] + [
            ("ddim", 25, 1.0),
            ("ddim", 50, 0.5),
        ]
        runs += [("ddim", 50, 1.0), ("ddim", 100, 1.0), ("ddpm", 1000, 0.0)]
        if args.fd_runs:
            runs = [_run_spec(r) for r in args.fd_runs.split(",")]
        seeds = [int(v) for v in args.fd_seeds.split(",")]
        for sampler, steps, eta in runs:
            name = f"{sampler.upper()}-{steps}" + (f" eta={eta}" if sampler == "ddim" else "")
            values, seconds = [], 0.0
            for seed in seeds:
                start = time.perf_counter()
                imgs = sample_images(
                    model, sched, range(n), seed=seed, sampler=sampler, steps=steps, eta=eta
                )
                seconds += time.perf_counter() - start
                values.append(frechet_distance(pixel_features(imgs), real_f))
                log(f"{name} seed {seed}: FD {values[-1]:.4f}")
            fd.append(
                {"set": name, "fd": float(np.mean(values)), "fd_per_seed": values,
                 "fd_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                 "seeds": seeds, "seconds": seconds}
            )  # fmt: skip
        result["fd"] = fd
    result["machine"]["load_average_end"] = os.getloadavg()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
