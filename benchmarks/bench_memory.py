"""Memory benchmark: the loop's selection and pool entropy, driver and actor peak RSS vs pool size.

For each case m:B (pool multiple, training-set size) a run folder is laid out as the loop lays it out after iteration 0
(training set refs, pool ``gen_0`` of N = m x B synthetic embeddings as Parquet shards
``{id, embedding fixed_size_list<float32>}``, ids contiguous per file as the loop writes them,
or scattered with ``--shuffled``; the vectors are
``bench_scale.write_pool``'s clustered rows). Then, in a subprocess of its own (so that its
peak RSS, ``VmHWM`` of ``/proc/self/status``, is its own: ``ru_maxrss`` would keep the
parent's RSS at the fork), the loop's own code runs:

- selection: ``Loop.next_train_set(1)``, paradigm replace: B of the N candidates;
- entropy: the pool's KL entropy as the metrics stage computes it.

Two paths: ``sharded`` (``knn.shards = S``: the actors read their rows from the files,
``loop/measure.py: pool_entropy_sharded``) and ``single`` (``knn.shards = 1``: the driver
gathers the pool, in-process selection and ``kl_entropy``). Driver peak RSS after each phase;
peak RSS of every shard actor (``bench_scale.ActorRss``: ``ray::...Shard`` processes, sampled
every 0.2 s; only the bench's own Ray's when it started one). Per-row bytes are
least-squares coefficients of the peaks on (1, N, B) for the driver and (1, N / S, B) for an
actor: varying m at a fixed B separates what grows with the pool from what grows with the
budget. Usage::

    python benchmarks/bench_memory.py --data DIR [--grid 5:400 5:2000 25:400 100:400] \
        [--shards 2] [--paths sharded single] [--readme]
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
from bench_scale import ActorRss, write_pool
from readme_section import update_readme

HERE = Path(__file__).resolve().parent
SECTION = "## Memory: the loop's driver and workers"
FEATURES = "pixel"
GB24 = 24e9
LOOP_M = 5  # the loop's default pool_multiple, for the 24 GB extrapolation
ROOT_PID = "BENCH_MEMORY_RAY_PID"


def write_run(
    folder: Path, b: int, m: int, d: int, files: int, seed: int = 0, shuffled: bool = False
) -> Path:
    """A run folder after iteration 0: its training set (B refs) and pool gen_0 (m x B rows),
    ids contiguous per file as the loop writes them, or (``shuffled``) scattered over the files,
    the worst case of the actors' row lists (``FileRows``)."""
    emb = folder / "iter_000" / "embeddings" / FEATURES
    if emb.is_dir() and len(list(emb.glob("*.parquet"))) == files:
        return folder
    n = m * b
    raw = write_pool(folder / "npy", n, d, seed, 1)
    x = np.load(next(raw.glob("*.npy")), mmap_mode="r")
    emb.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(n) if shuffled else np.arange(n)
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


def _track_tree(stop: Any, me: int) -> None:
    """Record the pids below process ``me`` (the Ray's raylet -> workers) while the case runs."""
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


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since its exec (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


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

    path, m, b = args.case.split(":")
    m, b = int(m), int(b)
    n = m * b
    run = str(_folder(Path(args.data), m, b))
    shards = args.shards if path == "sharded" else 1
    root = os.environ.get(ROOT_PID)  # the bench's own Ray: its workers are that pid's descendants
    own = root is not None
    stop = threading.Event()
    if own:
        threading.Thread(target=_track_tree, args=(stop, int(root)), daemon=True).start()
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cfg = load_config(None, [
        f"loop.storage={run}", "loop.paradigm=replace", f"loop.train_size={b}",
        f"loop.metric_features=[{FEATURES}]", f"features.name={FEATURES}",
        f"select.method={args.method}", f"knn.shards={shards}", f"knn.k={args.k}",
    ])  # fmt: skip
    out: dict[str, Any] = {"path": path, "m": m, "b": b, "n": n, "shards": shards}
    base = peak_rss_mb()
    rss = OwnActorRss(own)
    t0 = time.perf_counter()
    cat = Catalog(run, 1)
    refs = Loop(cfg, RunDir(run), cat, [FEATURES], log=lambda m: None).next_train_set(1)
    out["select_seconds"] = time.perf_counter() - t0
    out["selected"] = len(refs)
    out["driver_select_peak_mb"] = peak_rss_mb()
    out["select_actor_peak_mb"] = [r / 2**20 for r in rss.stop()]
    rss = OwnActorRss(own)
    t0 = time.perf_counter()
    uri = cat.embeddings_uri(origin_of(0), FEATURES)
    if path == "sharded":
        out["entropy"] = pool_entropy_sharded(uri, n, args.k, 1e-10, shards)
    else:
        out["entropy"] = kl_entropy(cat.embeddings(origin_of(0), FEATURES)[1], k=args.k).entropy
    out["entropy_seconds"] = time.perf_counter() - t0
    out["driver_peak_mb"] = peak_rss_mb()
    out["entropy_actor_peak_mb"] = [r / 2**20 for r in rss.stop()]
    out["driver_base_mb"] = base
    stop.set()
    ray.shutdown()
    return out


def _folder(data: Path, m: int, b: int) -> Path:
    return data / f"m{m}_b{b}"


def linear_fit(rows: list[list[float]], ys: list[float]) -> np.ndarray:
    """Least-squares coefficients of ys on the columns of rows (a column that does not vary, or
    one that repeats another, gets 0: only what the cases vary is measured)."""
    a = np.asarray(rows, dtype=float)
    keep = [0] + [j for j in range(1, a.shape[1]) if np.ptp(a[:, j]) > 0]
    coef = np.zeros(a.shape[1])
    sol, *_ = np.linalg.lstsq(a[:, keep], np.asarray(ys, dtype=float), rcond=None)
    coef[keep] = sol
    return coef


def summarize(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per pool row and per selected row on the driver, per row held by an actor, from
    least-squares fits of the peaks (driver on 1, N, B; an actor on 1, N / S, B); and the largest
    B (pool m = 5 x B, ``LOOP_M``) whose driver + S actors fit in 24 GB on one machine."""
    fits: dict[str, Any] = {}
    for path in args.paths:
        cases = [c for c in results["cases"] if c.get("path") == path and "error" not in c]
        if not cases:
            continue
        s = cases[0]["shards"]
        drv = linear_fit([[1, c["n"], c["b"]] for c in cases],
                         [c["driver_peak_mb"] * 2**20 for c in cases])  # fmt: skip
        act = np.zeros(3)
        if path == "sharded":
            act = linear_fit(
                [[1, c["n"] / s, c["b"]] for c in cases],
                [
                    max(c["select_actor_peak_mb"] + c["entropy_actor_peak_mb"]) * 2**20
                    for c in cases
                ],
            )
        per_drv_b = max(drv[1], 0) * LOOP_M + max(drv[2], 0)  # driver bytes per unit of B, m = 5
        per_b = per_drv_b
        per_b += s * (max(act[1], 0) * LOOP_M / s + max(act[2], 0)) if path == "sharded" else 0
        room = GB24 - drv[0] - (s * act[0] if path == "sharded" else 0)
        ns = sorted(c["n"] for c in cases)
        fits[path] = {
            "driver_bytes_per_pool_row": drv[1], "driver_bytes_per_selected_row": drv[2],
            "driver_intercept_mb": drv[0] / 2**20,
            "actor_bytes_per_row_held": act[1], "actor_bytes_per_selected_row": act[2],
            "actor_intercept_mb": act[0] / 2**20,
            "max_b_24gb": room / per_b if per_b > 0 else float("inf"),
            # multi-node: the driver's machine alone, and one actor per 24 GB machine
            "max_b_driver_24gb": (GB24 - drv[0]) / per_drv_b if per_drv_b > 0 else float("inf"),
            "max_rows_per_actor_24gb": (GB24 - act[0]) / act[1] if act[1] > 0 else float("inf"),
            "n_range": [ns[0], ns[-1]],
        }  # fmt: skip
    return fits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the run folders")
    p.add_argument("--grid", nargs="+", default=["5:400", "5:2000", "25:400", "100:400"],
                   help="m:B cases: a training set of B selected from a pool of m x B rows "
                   "(the loop: m = loop.pool_multiple, B = loop.train_size)")  # fmt: skip
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--files", type=int, default=4, help="Parquet files per pool")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--shuffled", action="store_true",
                   help="ids scattered over the files (the actors then get row lists)")  # fmt: skip
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
    try:
        grid = [(int(g.split(":")[0]), int(g.split(":")[1])) for g in args.grid]
    except (IndexError, ValueError):
        p.error(f"--grid takes m:B pairs of integers, got {args.grid}")
    for m, b in grid:
        write_run(_folder(data, m, b), b, m, args.d, args.files, shuffled=args.shuffled)
    argv_ = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    if not env.get("RAY_ADDRESS"):
        # One Ray for all cases, started here (a Ray per case times out on a loaded host); each
        # case connects as the loop's driver would and counts only this Ray's actors.
        import ray

        ray.init(address="local", num_cpus=max(2, args.shards), include_dashboard=False,
                 log_to_driver=False, object_store_memory=200 * 2**20)  # fmt: skip
        env = dict(os.environ)  # after init: it may have set the cluster's auth token there
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        env[ROOT_PID] = str(os.getpid())
    results: dict[str, Any] = {"uptime_before": _uptime(), "args": vars(args), "cases": []}
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
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
    if ROOT_PID in env:
        import ray

        ray.shutdown()
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
        f"`python benchmarks/bench_memory.py --data DIR --grid {' '.join(a['grid'])} "
        f"--paths {' '.join(a['paths'])} {'--shuffled ' if a['shuffled'] else ''}"
        f"--shards {a['shards']} --d {a['d']} --method {a['method']}` "
        f"(one local Ray, each case a driver process of its own, {os.cpu_count()} cores). `uptime` before: `{r['uptime_before']}`; "
        f"after: `{r['uptime_after']}` (the host is shared).", "",
        "| path | m | B | N = m B | select s | entropy s | driver peak MB (after select / total) "
        "| select actor peak MB (max) | entropy actor peak MB (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for c in r["cases"]:
        if "error" in c:
            lines.append(f"| {c['path']} | {c['m']} | {c['b']} | | failed | | | | |")
            continue
        lines.append(
            f"| {c['path']} | {c['m']} | {c['b']} | {c['n']} | {c['select_seconds']:.1f} | "
            f"{c['entropy_seconds']:.1f} | {c['driver_select_peak_mb']:.0f} / {c['driver_peak_mb']:.0f} | "
            f"{_mb(c['select_actor_peak_mb'])} | {_mb(c['entropy_actor_peak_mb'])} |"
        )
    lines.append("")
    for path, f in r["fits"].items():
        lines.append(
            f"- {path} (least squares over N = {f['n_range'][0]}..{f['n_range'][1]}): driver "
            f"{f['driver_bytes_per_pool_row']:.0f} bytes per pool row + "
            f"{f['driver_bytes_per_selected_row']:.0f} per selected row over "
            f"{f['driver_intercept_mb']:.0f} MB; an actor {f['actor_bytes_per_row_held']:.0f} "
            f"bytes per row it holds + {f['actor_bytes_per_selected_row']:.0f} per selected row "
            f"over {f['actor_intercept_mb']:.0f} MB. Extrapolated (m = {LOOP_M}, driver + "
            f"{a['shards'] if path == 'sharded' else 0} actors on one 24 GB machine): "
            f"B <= {f['max_b_24gb']:.3g}"
            + (
                f"; the driver's machine alone (actors elsewhere): B <= "
                f"{f['max_b_driver_24gb']:.3g}, and an actor per 24 GB machine holds <= "
                f"{f['max_rows_per_actor_24gb']:.3g} rows (B <= S x that / {LOOP_M})"
                if path == "sharded"
                else ""
            )
        )
    lines += [
        "",
        "On the sharded path the vectors never reach the driver, so its growth does not depend "
        "on d: it is the candidates' references and ids (12 bytes a candidate in the paradigm's "
        "plan, an id column per file) and, for the entropy, the merged kNN batches (bounded by the "
        "batch size) and r_k (8 bytes per row). The single path's driver holds the vectors "
        "(N x d x 4 bytes, plus the selection's and the kNN's working copies) and grows with d. "
        "Outside these two stages the training-set stage streams the images it needs "
        "(benchmarks/bench_train_set_memory.py) and the metrics stage reads the pool's embeddings "
        "for the Fréchet distance and PRDC.",
    ]
    return "\n".join(lines) + "\n"


def _mb(peaks: list[float]) -> str:
    return f"{max(peaks):.0f}" if peaks else "-"


if __name__ == "__main__":
    main()
