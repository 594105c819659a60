"""One-GPU benchmark: exact selection and entropy on CUDA, and unet48 generation/training.

Run through ``benchmarks/gpu.sh`` (see benchmarks/README.md, "GPU"). Cases, each timed once
after the data is on the host (data generation and the first CUDA initialisation excluded):

* KL entropy (k = 3) of 10^6 x 512 (target <= 10 s) and 10^7 x 64 clustered points;
* exact greedy and threshold decay, 10^6 -> 10^5 at d = 512 (greedy target <= 60 s); equality
  with the CPU (numpy) path checked on the first 10^5 rows (a random subsample: rows are iid)
  with budget 10^4, and for the entropy on the first 10^5 rows;
* DDIM-50 (eta 0.5) generation and bf16 training throughput of ``unet48`` at 32 x 32 x 3
  (images/s) at the largest batch that fits (doubling batch sizes until out of memory).

``--cpu-smoke`` runs every case at small sizes on the CPU (the torch backend on the CPU device,
DDIM-2), so the script is exercised without a GPU. Prints one table, writes JSON (``--out``).
Installs nothing; exits 1 with a message when CUDA or a dependency is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

MISSING = []
try:
    import numpy as np
    import torch

    from raycollapse.curation.entropy import kl_entropy
    from raycollapse.curation.select import greedy_run, threshold_select
    from raycollapse.diffusion.sampling import (
        images_to_tensor,
        make_scheduler,
        sample_images,
        sampling_autocast,
        sampling_network,
    )
    from raycollapse.diffusion.train_parts import channels_last_on_cuda
    from raycollapse.diffusion.trainer import EMA, make_optimizer, train_step
    from raycollapse.diffusion.unet import build_unet
    from raycollapse.neighbors.device import faiss_has_gpu
except ImportError as exc:  # reported by main(): the script installs nothing
    MISSING.append(str(exc))

FULL = {
    "entropy": [(1_000_000, 512, 10.0), (10_000_000, 64, None)],
    "select": (1_000_000, 512, 100_000, 60.0),
    "check": (100_000, 10_000),  # equality with the CPU path: rows, budget
    "steps": 50,
    "gen_batches": [256, 512, 1024, 2048, 4096, 8192],
    "train_batches": [64, 128, 256, 512, 1024, 2048],
    "train_steps": 20,
}
SMOKE = {
    "entropy": [(1500, 32, None), (3000, 8, None)],
    "select": (2000, 16, 200, None),
    "check": (600, 60),
    "steps": 2,
    "gen_batches": [1, 2],
    "train_batches": [1, 2],
    "train_steps": 1,
}


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def clustered(n: int, d: int, seed: int, n_clusters: int = 200, sub: int = 16) -> np.ndarray:
    """The data of bench_core.py (200 Gaussians in a random 16-d subspace plus noise of std
    0.05), generated in float32 chunks of 2^18 rows to bound memory at 10^7 x 64."""
    sub = min(sub, d)
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, sub)))[0].T.astype(np.float32)
    means = (4.0 * rng.standard_normal((n_clusters, sub))).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, n_clusters).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        m = min(1 << 18, n - s)
        lab = rng.integers(0, n_clusters, m)
        z = means[lab] + rng.standard_normal((m, sub), dtype=np.float32) * scales[lab, None]
        out[s : s + m] = z @ basis + 0.05 * rng.standard_normal((m, d), dtype=np.float32)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(on: str, fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    _sync(on)
    t = time.perf_counter()
    out = fn(*args, **kw)
    _sync(on)
    return out, time.perf_counter() - t


def bench_entropy(n: int, d: int, target: float | None, dev: str, check: int) -> dict:
    x = clustered(n, d, seed=n + d)
    res, sec = _timed(dev, kl_entropy, x, 3, device=dev, backend="torch")
    sub = x[:check]
    equal = kl_entropy(sub, 3, device=dev, backend="torch").entropy == kl_entropy(sub, 3).entropy
    path = "faiss-gpu" if dev.startswith("cuda") and faiss_has_gpu() else "torch"
    return _row("entropy", n, d, None, sec, target, equal, path, entropy=res.entropy)


def bench_selection(
    n: int, d: int, budget: int, target: float | None, dev: str, check: tuple
) -> list:
    x = clustered(n, d, seed=7)
    sub, b_sub = x[: check[0]], check[1]
    rows = []
    res, sec = _timed(dev, greedy_run, x, budget, 0, device=dev, backend="torch")
    on_dev = greedy_run(sub, b_sub, 0, device=dev, backend="torch").indices
    equal = bool(np.array_equal(on_dev, greedy_run(sub, b_sub, 0).indices))
    rows.append(_row("greedy", n, d, budget, sec, target, equal, "torch", batches=res.batches))
    th, sec = _timed(dev, threshold_select, x, budget, device=dev, backend="torch")
    a = threshold_select(sub, b_sub, device=dev, backend="torch")
    b = threshold_select(sub, b_sub)
    equal = bool(np.array_equal(a.indices, b.indices)) and (a.passes, a.tau_final) == (
        b.passes,
        b.tau_final,
    )
    rows.append(_row("threshold", n, d, budget, sec, None, equal, "torch", passes=th.passes))
    return rows


def _row(case, n, d, budget, sec, target, equal, path, **extra) -> dict:
    met = None if target is None else bool(sec <= target)
    log(f"{case} n={n} d={d} B={budget}: {sec:.2f} s, equal={equal}, target met={met}")
    return {"case": case, "n": n, "d": d, "budget": budget, "seconds": sec, "target_s": target,
            "met": met, "equal": bool(equal), "path": path, **extra}  # fmt: skip


def _fits(fn: Any, dev: str) -> float | None:
    """Seconds of ``fn()``, or None when the device runs out of memory."""
    try:
        return _timed(dev, fn)[1]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def bench_generation(dev: str, batches: list[int], steps: int) -> dict:
    # The generation stage's path: channels-last on CUDA, sample.precision=auto (bf16 on CUDA).
    model = sampling_network(
        build_unet("unet48", resolution=32, channels=3, seed=0).to(dev), dev, False
    )
    sched = make_scheduler()
    cuda = dev.startswith("cuda")

    def run(batch: int, steps_: int, bf16: bool) -> Any:
        amp = sampling_autocast("auto" if bf16 else "fp32", dev)

        def go() -> None:
            sample_images(model, sched, np.arange(batch), seed=0, sampler="ddim", steps=steps_,
                          eta=0.5, group_size=batch, device=dev, amp_dtype=amp)  # fmt: skip

        return go

    tried = []
    for batch in batches:
        if _fits(run(batch, 1, True), dev) is None:  # warm-up and memory probe
            break
        sec = _fits(run(batch, steps, True), dev)
        if sec is None:
            break
        tried.append({"batch": batch, "seconds": sec, "images_per_second": batch / sec})
        log(f"generation bf16={cuda} batch {batch}: {batch / sec:.1f} images/s")
    best = max(tried, key=lambda r: r["images_per_second"])
    fp32 = _fits(run(best["batch"], steps, False), dev)
    return {"preset": "unet48", "resolution": 32, "sampler": "ddim", "steps": steps,
            "eta": 0.5, "largest_batch": tried[-1]["batch"], "best": best, "tried": tried,
            "bf16": cuda, "fp32_images_per_second": None if fp32 is None else best["batch"] / fp32}  # fmt: skip


def bench_training(dev: str, batches: list[int], steps: int) -> dict:
    cuda = dev.startswith("cuda")
    amp = torch.bfloat16 if cuda else None
    tried = []
    for batch in batches:
        model = build_unet("unet48", resolution=32, channels=3, seed=0).to(dev)
        channels_last_on_cuda(model, dev)  # as train_loop does
        opt = make_optimizer(model, 1e-4)
        ema = EMA(model, 0.999)
        sched = make_scheduler()
        gen = torch.Generator(device=dev).manual_seed(0)
        pix = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        x = images_to_tensor(pix, dev)
        kw = dict(noise_scheduler=sched, optimizer=opt, ema=ema, generator=gen, amp_dtype=amp)

        def go(n: int, x: Any = x, model: Any = model, kw: dict = kw) -> None:
            for _ in range(n):
                train_step(model, x, None, **kw)

        if _fits(lambda: go(1), dev) is None:  # warm-up and memory probe
            break
        sec = _fits(lambda: go(steps), dev)
        del model, opt, ema
        if sec is None:
            break
        tried.append({"batch": batch, "seconds": sec, "images_per_second": batch * steps / sec})
        log(f"training bf16={cuda} batch {batch}: {batch * steps / sec:.1f} images/s")
    best = max(tried, key=lambda r: r["images_per_second"])
    return {"preset": "unet48", "resolution": 32, "bf16": cuda, "steps": steps,
            "largest_batch": tried[-1]["batch"], "best": best, "tried": tried}  # fmt: skip


def table(out: dict) -> str:
    lines = ["| case | N | d | B | seconds | target s | met | equal to CPU | path |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        lines.append(
            f"| {r['case']} | {r['n']} | {r['d']} | {r['budget'] or '-'} | {r['seconds']:.2f} "
            f"| {r['target_s'] or '-'} | {r['met']} | {r['equal']} | {r['path']} |"
        )
    g, t = out["generation"], out["training"]
    lines.append(
        f"\nunet48 32x32 DDIM-{g['steps']}: {g['best']['images_per_second']:.1f} images/s "
        f"(bf16={g['bf16']}, batch {g['best']['batch']}, largest fitting {g['largest_batch']}; "
        f"fp32 {g['fp32_images_per_second'] or 0:.1f} images/s)"
    )
    lines.append(
        f"unet48 32x32 training: {t['best']['images_per_second']:.1f} images/s "
        f"(bf16={t['bf16']}, batch {t['best']['batch']}, largest fitting {t['largest_batch']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="small sizes on the CPU")
    p.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON output")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    args = p.parse_args(argv)
    if MISSING:
        print(
            f"bench_gpu: missing dependency: {MISSING[0]}; install the project first",
            file=sys.stderr,
        )
        return 1
    if args.cpu_smoke:
        dev, sizes = "cpu", SMOKE
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: CUDA is not available (torch.cuda.is_available() is False); "
                  "run on a GPU machine or pass --cpu-smoke", file=sys.stderr)  # fmt: skip
            return 1
        dev, sizes = args.device, FULL
        torch.zeros(1, device=dev)  # CUDA initialisation outside the timings
    out: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "cuda",
        "device": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "faiss_gpu": faiss_has_gpu(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "rows": [],
    }  # fmt: skip
    for n, d, target in sizes["entropy"]:
        out["rows"].append(bench_entropy(n, d, target, dev, sizes["check"][0]))
    n, d, budget, target = sizes["select"]
    out["rows"] += bench_selection(n, d, budget, target, dev, sizes["check"])
    out["generation"] = bench_generation(dev, sizes["gen_batches"], sizes["steps"])
    out["training"] = bench_training(dev, sizes["train_batches"], sizes["train_steps"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
