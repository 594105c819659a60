"""Memory benchmark: the driver's peak RSS in the loop's training-set stage and sample grid.

For each case m:B a run folder is laid out as the loop lays it out after iteration 0: the real
data (B images, one Parquet file), pool ``gen_0`` of N = m x B images (PNG, ``side x side x 3``,
shards of ``--shard-rows`` rows as the generate stage writes them), its embedding ids (feature
space ``pixel``) and iteration 0's training set. Then, in a process of its own (peak RSS =
``VmHWM`` of ``/proc/self/status``), the loop's own code runs:

- train_set: ``Loop.stage_train_set(1)``, paradigm replace, selection none: B of the N
  candidates, read, encoded and written as the training set's Parquet file;
- samples: ``loop.measure.write_samples_png`` (the first 64 pool images as a grid).

``--code DIR`` runs the cases with the ``raycollapse`` package found in DIR instead (e.g. an
older checkout, to compare before/after). No Ray is needed (selection none). Usage::

    python benchmarks/bench_train_set_memory.py --data DIR [--grid 5:1000 50:1000 5:10000] \
        [--side 32] [--code DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _images_table(ids: np.ndarray, side: int, seed: int) -> pa.Table:
    """Smooth random RGB images (a 4 x 4 noise upscaled, plus a little noise): PNGs of a size
    between flat and pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (len(ids), 4, 4, 3), dtype=np.uint8)
    reps = -(-side // 4)
    img = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :side, :side]
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "image": pa.array([_png(im) for im in img], pa.binary()),
            "label": pa.nulls(len(ids), pa.int64()),
        }
    )


def write_run(folder: Path, m: int, b: int, side: int, shard_rows: int) -> Path:
    """The run folder of one case (kept between invocations)."""
    done = folder / "READY"
    if done.exists():
        return folder
    real = folder / "real" / "data"
    real.mkdir(parents=True, exist_ok=True)
    pq.write_table(_images_table(np.arange(b), side, 0), real / "part-00000.parquet")
    pool = folder / "iter_000" / "pool"
    emb = folder / "iter_000" / "embeddings" / "pixel"
    pool.mkdir(parents=True, exist_ok=True)
    emb.mkdir(parents=True, exist_ok=True)
    n = m * b
    for s, lo in enumerate(range(0, n, shard_rows)):
        ids = np.arange(lo, min(n, lo + shard_rows))
        pq.write_table(_images_table(ids, side, 1 + s), pool / f"part-{s:05d}.parquet")
        x = np.zeros((len(ids), 2), np.float32)
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2),
            }
        )
        pq.write_table(table, emb / f"part-{s:05d}.parquet")
    ts = folder / "iter_000" / "train_set"
    ts.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": pa.array(np.arange(b), pa.int64()),
                "origin": pa.array(["real"] * b, pa.string()),
                "origin_id": pa.array(np.arange(b), pa.int64()),
            }
        ),
        ts / "part-00000.parquet",
    )
    done.write_text("ok")
    return folder


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since its exec (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_case(case: str, data: Path) -> dict[str, Any]:
    """One case m:B in this process: the training-set stage, then the sample grid."""
    from raycollapse.config import load_config
    from raycollapse.loop.catalog import Catalog
    from raycollapse.loop.measure import write_samples_png
    from raycollapse.loop.rundir import RunDir
    from raycollapse.loop.runner import Loop

    m, b = (int(v) for v in case.split(":"))
    run = str(data / f"m{m}_b{b}")
    cfg = load_config(None, [
        f"loop.storage={run}", "loop.paradigm=replace", f"loop.train_size={b}",
        "loop.metric_features=[pixel]", "features.name=pixel", "select.method=none",
    ])  # fmt: skip
    out: dict[str, Any] = {"m": m, "b": b, "n": m * b, "base_mb": peak_rss_mb()}
    loop = Loop(cfg, RunDir(run), Catalog(run, 3), ["pixel"], log=lambda _: None)
    t0 = time.perf_counter()
    out["rows"] = loop.stage_train_set(1)["rows"]
    out["train_set_seconds"] = time.perf_counter() - t0
    out["train_set_peak_mb"] = peak_rss_mb()
    train = Path(run) / "iter_001" / "train_set" / "part-00000.parquet"
    out["train_set_bytes"] = train.stat().st_size
    out["train_set_sha256"] = __import__("hashlib").sha256(train.read_bytes()).hexdigest()
    t0 = time.perf_counter()
    write_samples_png(loop.cat, 0, str(Path(run) / "iter_000" / "samples.png"))
    out["samples_seconds"] = time.perf_counter() - t0
    out["samples_peak_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the run folders")
    p.add_argument("--grid", nargs="+", default=["5:1000", "50:1000", "5:10000"],
                   help="m:B cases (pool of m x B images, training set of B)")  # fmt: skip
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--code", help="a folder holding the raycollapse package to measure")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    data = Path(args.data)
    if args.case:
        res = run_case(args.case, data)
        print(json.dumps(res))
        return [res]
    for g in args.grid:
        m, b = (int(v) for v in g.split(":"))
        write_run(data / f"m{m}_b{b}", m, b, args.side, args.shard_rows)
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([args.code, env.get("PYTHONPATH", "")])
    results = []
    for g in args.grid:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--case", g]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            res = {"case": g, "error": proc.stderr[-3000:]}
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
