"""Memory benchmark: the loop's selection and pool entropy, driver and actor peak RSS vs pool size.

For each training-set size B a run folder is laid out as the loop lays it out after iteration 0
(training set refs, pool ``gen_0`` of N = m x B synthetic embeddings as Parquet shards
``{id, embedding fixed_size_list<float32>}``, ids shuffled across files; the vectors are
``bench_scale.write_pool``'s clustered rows). Then, in a subprocess of its own (so that its
``ru_maxrss`` is its own), the loop's own code runs:

- selection: ``Loop.next_train_set(1)``, paradigm replace: B of the N candidates;
- entropy: the pool's KL entropy as the metrics stage computes it.

Two paths: ``sharded`` (``knn.shards = S``: the actors read their rows from the files,
``loop/measure.py: pool_entropy_sharded``) and ``single`` (``knn.shards = 1``: the driver
gathers the pool, in-process selection and ``kl_entropy``). Driver peak RSS after each phase;
peak RSS of every shard actor (``bench_scale.ActorRss``: ``ray::...Shard`` processes, sampled
every 0.2 s; with a Ray started by the case only its own descendants count). Per-row bytes are
least-squares slopes of the peaks against N (driver) and N / S (an actor). Usage::

    python benchmarks/bench_memory.py --data DIR [--budgets 400 2000 10000] [--pool-multiple 5] \
        [--shards 2] [--paths sharded single] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_scale import ActorRss, write_pool
from readme_section import update_readme

HERE = Path(__file__).resolve().parent
SECTION = "## Memory: the loop's driver and workers"
FEATURES = "pixel"
GB24 = 24e9


def write_run(folder: Path, b: int, m: int, d: int, files: int, seed: int = 0) -> Path:
    """A run folder after iteration 0: its training set (B refs) and pool gen_0 (m x B rows)."""
    emb = folder / "iter_000" / "embeddings" / FEATURES
    if emb.is_dir() and len(list(emb.glob("*.parquet"))) == files:
        return folder
    n = m * b
    raw = write_pool(folder / "npy", n, d, seed, 1)
    x = np.load(next(raw.glob("*.npy")), mmap_mode="r")
    emb.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(n)  # ids shuffled across the files
    for j, part in enumerate(np.array_split(order, files)):
        rows = np.asarray(x[np.sort(part)], dtype=np.float32)
        table = pa.table(
            {
                "id": pa.array(np.sort(part), pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), d),
            }
        )
        pq.write_table(table, emb / f"part-{j:05d}.parquet")
    (folder / "npy" / "part-00000.npy").unlink()
    ts = folder / "iter_000" / "train_set"
    ts.mkdir(parents=True)
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
    return folder


class OwnActorRss(ActorRss):
    """``ActorRss`` restricted to descendants of this process when it started Ray itself (other
    users' actors on a shared host are not ours); joined to another Ray, every shard actor."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.own = own

    def stop(self) -> list[int]:
        super().stop()
        return sorted(r for pid, (_, r) in self.peak.items() if not self.own or pid in _SEEN)


_SEEN: set[int] = set()  # pids seen below this process (its Ray's raylet and workers)


def _track_tree(stop: Any) -> None:
    """Record the pids below this process (raylet -> workers) while the case runs."""
    me = os.getpid()
    while not stop.wait(0.1):
        parent: dict[int, int] = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    parent[int(pid)] = int(
                        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                    )
                except (OSError, IndexError, ValueError):
                    continue
        for pid in parent:
            p, hops = pid, 0
            while p in parent and p != me and hops < 16:
                p, hops = parent[p], hops + 1
            if p == me:
                _SEEN.add(pid)


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One (path, B) in this process: selection then entropy; their figures."""
    import threading

    import ray

    from raycollapse.config import load_config
    from raycollapse.curation.entropy import kl_entropy
    from raycollapse.loop.catalog import Catalog, origin_of
    from raycollapse.loop.measure import pool_entropy_sharded
    from raycollapse.loop.rundir import RunDir
    from raycollapse.loop.runner import Loop

    path, b = args.case.split(":")
    b = int(b)
    n = args.pool_multiple * b
    run = str(Path(args.data) / f"b{b}")
    shards = args.shards if path == "sharded" else 1
    own = not os.environ.get("RAY_ADDRESS")
    stop = threading.Event()
    threading.Thread(target=_track_tree, args=(stop,), daemon=True).start()
    if own:  # a Ray of this case's own: its processes are this process's descendants
        ray.init(address="local", num_cpus=max(2, shards), include_dashboard=False,
                 log_to_driver=False, object_store_memory=200 * 2**20)  # fmt: skip
    else:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cfg = load_config(None, [
        f"loop.storage={run}", "loop.paradigm=replace", f"loop.train_size={b}",
        f"loop.metric_features=[{FEATURES}]", f"features.name={FEATURES}",
        f"select.method={args.method}", f"knn.shards={shards}", f"knn.k={args.k}",
    ])  # fmt: skip
    out: dict[str, Any] = {"path": path, "b": b, "n": n, "shards": shards}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = OwnActorRss(own)
    t0 = time.perf_counter()
    cat = Catalog(run, 1)
    refs = Loop(cfg, RunDir(run), cat, [FEATURES], log=lambda m: None).next_train_set(1)
    out["select_seconds"] = time.perf_counter() - t0
    out["selected"] = len(refs)
    out["driver_select_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["select_actor_peak_mb"] = [r / 2**20 for r in rss.stop()]
    rss = OwnActorRss(own)
    t0 = time.perf_counter()
    uri = cat.embeddings_uri(origin_of(0), FEATURES)
    if path == "sharded":
        out["entropy"] = pool_entropy_sharded(uri, n, args.k, 1e-10, shards)
    else:
        out["entropy"] = kl_entropy(cat.embeddings(origin_of(0), FEATURES)[1], k=args.k).entropy
    out["entropy_seconds"] = time.perf_counter() - t0
    out["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["entropy_actor_peak_mb"] = [r / 2**20 for r in rss.stop()]
    out["driver_base_mb"] = base / 2**20
    stop.set()
    ray.shutdown()
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def summarize(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-row bytes (driver per pool row, actor per row it holds) and the largest B whose
    extrapolated driver + S actors fit in 24 GB on one machine."""
    fits: dict[str, Any] = {}
    for path in args.paths:
        cases = [c for c in results["cases"] if c.get("path") == path and "error" not in c]
        if not cases:
            continue
        ns = [c["n"] for c in cases]
        drv = [c["driver_peak_mb"] * 2**20 for c in cases]
        act = [max(c["select_actor_peak_mb"] + c["entropy_actor_peak_mb"], default=0) * 2**20
               for c in cases]  # fmt: skip
        s = cases[0]["shards"]
        per_drv = max(slope(ns, drv), 0.0)
        per_act = max(slope([n / s for n in ns], act), 0.0) if path == "sharded" else 0.0
        c0 = cases[0]
        drv0 = drv[0] - per_drv * c0["n"]  # the fit's intercept: Python, Ray, torch, ...
        act0 = (act[0] - per_act * c0["n"] / s) if path == "sharded" else 0.0
        per_row_node = per_drv + per_act  # S actors hold N / S rows each: N rows in all
        room = GB24 - drv0 - s * act0 * (path == "sharded")
        n_max = room / per_row_node if per_row_node > 0 else float("inf")
        fits[path] = {
            "driver_bytes_per_row": per_drv, "actor_bytes_per_row": per_act,
            "driver_intercept_mb": drv0 / 2**20, "actor_intercept_mb": act0 / 2**20,
            "max_n_24gb": n_max, "max_b_24gb": n_max / args.pool_multiple,
            "driver_growth_mb": (drv[-1] - drv[0]) / 2**20, "n_range": [ns[0], ns[-1]],
        }  # fmt: skip
    return fits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the run folders")
    p.add_argument("--budgets", type=int, nargs="+", default=[400, 2000, 10000], help="B")
    p.add_argument("--pool-multiple", type=int, default=5, help="m: the pool holds m x B rows")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--files", type=int, default=4, help="Parquet files per pool")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--method", default="greedy", choices=["greedy", "threshold"])
    p.add_argument("--paths", nargs="+", default=["sharded", "single"],
                   choices=["sharded", "single"])  # fmt: skip
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--readme", action="store_true", help="write the section of README.md")
    args = p.parse_args(argv)
    if args.case:
        res = run_case(args)
        print(json.dumps(res))
        return res
    data = Path(args.data)
    for b in args.budgets:
        write_run(data / f"b{b}", b, args.pool_multiple, args.d, args.files)
    argv_ = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {"uptime_before": _uptime(), "args": vars(args), "cases": []}
    for path in args.paths:
        for b in args.budgets:
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv_, "--case", f"{path}:{b}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                case = {"path": path, "b": b, "error": proc.stderr[-3000:]}
            else:
                case = json.loads(proc.stdout.strip().splitlines()[-1])
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
    sel = {(c["path"], c["b"]): c.get("selected") for c in results["cases"]}
    results["same_size"] = all(v == k[1] for k, v in sel.items())
    results["fits"] = summarize(results, args)
    results["uptime_after"] = _uptime()
    print(json.dumps({"fits": results["fits"]}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if args.readme:
        update_readme(HERE / "README.md", SECTION, _section(results))
    return results


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def _section(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [
        SECTION, "",
        f"`python benchmarks/bench_memory.py --data DIR --budgets {' '.join(map(str, a['budgets']))} "
        f"--pool-multiple {a['pool_multiple']} --shards {a['shards']} --d {a['d']} --method {a['method']}` "
        f"(a local Ray per case, {os.cpu_count()} cores). `uptime` before: `{r['uptime_before']}`; "
        f"after: `{r['uptime_after']}` (the host is shared).", "",
        "| path | B | N = m B | select s | entropy s | driver peak MB (after select / total) "
        "| select actor peak MB (max) | entropy actor peak MB (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for c in r["cases"]:
        if "error" in c:
            lines.append(f"| {c['path']} | {c['b']} | | failed | | | | |")
            continue
        lines.append(
            f"| {c['path']} | {c['b']} | {c['n']} | {c['select_seconds']:.1f} | "
            f"{c['entropy_seconds']:.1f} | {c['driver_select_peak_mb']:.0f} / {c['driver_peak_mb']:.0f} | "
            f"{max(c['select_actor_peak_mb'], default=0):.0f} | "
            f"{max(c['entropy_actor_peak_mb'], default=0):.0f} |"
        )
    lines.append("")
    for path, f in r["fits"].items():
        lines.append(
            f"- {path}: driver {f['driver_bytes_per_row']:.0f} bytes per pool row "
            f"(peak grew {f['driver_growth_mb']:.0f} MB from N = {f['n_range'][0]} to "
            f"{f['n_range'][1]}), an actor {f['actor_bytes_per_row']:.0f} bytes per row it "
            f"holds; extrapolated to one 24 GB machine (driver + {a['shards'] if path == 'sharded' else 0} "
            f"actors): N <= {f['max_n_24gb']:.3g}, B <= {f['max_b_24gb']:.3g}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
