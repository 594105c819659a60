"""Memory benchmark: the loop's metrics stage (``loop/measure.py: iteration_metrics``), driver peak
RSS vs pool size, for the code in this checkout or another one (``--code DIR``: a folder holding
a ``raycollapse`` package, e.g. an older commit's, extracted with ``git archive``).

For each case m:B a run folder is laid out as after iteration 0's embed stage
(``bench_memory``'s pool ``gen_0`` of N = m x B clustered rows in 4 Parquet files and a
training set of B real refs; the real data: B rows of another seed's model, the values are not
the point). Each case runs in a subprocess of its own that connects to one local Ray started
here, reads the real data's embeddings (allowed on the driver: not pool-sized), then runs
``iteration_metrics`` for the pool in feature space ``pixel``; peak RSS (``VmHWM``) before and after. ``sharded``: ``knn.shards = S`` (the pool's
kNN on shard actors); ``single``: the in-process kNN. Usage::

    python benchmarks/bench_metrics_memory.py --data DIR [--grid 5:2000 5:10000] \\
        [--paths sharded single] [--shards 2] [--d 64] [--code DIR]
"""

from __future__ import annotations

import argparse
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
from bench_memory import FEATURES, _folder, peak_rss_mb, write_run
from bench_scale import write_pool

HERE = Path(__file__).resolve().parent


def write_real(folder: Path, b: int, d: int) -> None:
    """The real data: B embedding rows with ids 0..B-1 (the training set's refs) and a data
    folder whose schema says the data are not a mixture of Gaussians."""
    emb = folder / "real" / "embeddings" / FEATURES
    if emb.is_dir():
        return
    raw = write_pool(folder / "npy_real", b, d, 99, 1)
    x = np.asarray(np.load(next(raw.glob("*.npy"))), dtype=np.float32)
    emb.mkdir(parents=True)
    ids = pa.array(np.arange(b), pa.int64())
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    pq.write_table(pa.table({"id": ids, "embedding": vectors}), emb / "part-00000.parquet")
    (folder / "real" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": ids}), folder / "real" / "data" / "part-00000.parquet")
    (folder / "npy_real" / "part-00000.npy").unlink()


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One (path, m, B) in this process: the metrics row; driver peak RSS before and after."""
    import ray

    from raycollapse.loop.catalog import Catalog, read_train_refs
    from raycollapse.loop.measure import iteration_metrics

    path, m, b = args.case.split(":")
    m, b = int(m), int(b)
    run = str(_folder(Path(args.data), m, b))
    shards = args.shards if path == "sharded" else 1
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cat = Catalog(run, 1)
    refs = read_train_refs(str(Path(run) / "iter_000" / "train_set"))
    cat.embeddings("real", FEATURES)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    row = iteration_metrics(
        cat, 0, refs, features=[FEATURES], k=args.k, eps=1e-10, fid_available=False,
        shards=shards,
    )  # fmt: skip
    out = {
        "path": path, "m": m, "b": b, "n": m * b, "shards": shards,
        "seconds": time.perf_counter() - t0, "driver_base_mb": base,
        "driver_peak_mb": peak_rss_mb(), "row": row,
    }  # fmt: skip
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the run folders")
    p.add_argument("--grid", nargs="+", default=["5:2000", "5:10000"], help="m:B cases")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--paths", nargs="+", default=["sharded", "single"],
                   choices=["sharded", "single"])  # fmt: skip
    p.add_argument("--code", help="folder holding the raycollapse package to measure")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        res = run_case(args)
        print(json.dumps(res, default=str))
        return [res]
    grid = [(int(g.split(":")[0]), int(g.split(":")[1])) for g in args.grid]
    for m, b in grid:
        folder = _folder(Path(args.data), m, b)
        write_run(folder, b, m, args.d, 4)
        write_real(folder, b, args.d)
    import ray

    ray.init(address="local", num_cpus=max(2, args.shards), include_dashboard=False,
             log_to_driver=False, object_store_memory=200 * 2**20)  # fmt: skip
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.code).resolve()), str(HERE)])
    argv_ = sys.argv[1:] if argv is None else argv
    results = []
    for path in args.paths:
        for m, b in grid:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                *argv_,
                "--case",
                f"{path}:{m}:{b}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                case = {"path": path, "m": m, "b": b, "error": proc.stderr[-3000:]}
            else:
                case = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(case)
            print(json.dumps(case), flush=True)
    ray.shutdown()
    return results


if __name__ == "__main__":
    main()
