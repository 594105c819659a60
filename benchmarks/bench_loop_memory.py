"""Memory benchmark: a whole ``raycollapse run`` (2 iterations), driver and Ray worker peak RSS vs B.

For each training-set size B of ``--grid`` (and each ``knn.shards`` of ``--shards``, each
paradigm of ``--paradigms``) a real loop runs end to end as ``raycollapse run`` in a subprocess:
a synthetic real data set of ``--real-multiple`` x B grayscale ``side x side`` images (sklearn's
digits, each shifted, mixed with another digit and noised, so that no two are equal and the kNN
is not degenerate) written as a Parquet data folder (``data.source=parquet``), ``model.preset=tiny``,
a few training steps, DDIM with few steps, pixel features, ``loop.iterations=2`` (iteration 1
selects B of the m x B candidates of pool 0, greedy, and builds its training set from them),
generation and embedding on Ray actors (``resources.*_actors=1``: separate worker processes).

Memory, per run:

- driver: ``VmHWM`` of the CLI process (the subprocess is this file with ``--case``: it runs the
  CLI's ``main`` and then prints its own ``VmHWM``), also sampled every 0.2 s to attribute it to
  the stage that was running (the loop's ``iteration t STAGE ...`` log lines);
- workers: every ``ray::`` process below this process (this benchmark starts a Ray of its own
  with a private temp dir and hands its address to the run in ``RAY_ADDRESS``; other users' Rays on
  a shared host are not counted), sampled every 0.2 s: the largest single worker's peak RSS and the
  peak of their summed RSS at one instant; the Ray system processes (raylet, GCS, agents) apart.

Per-B growth is the least-squares slope of each peak on B; extrapolated to 24 GB: the largest B
whose driver fits alone, and whose driver + workers + Ray's own processes fit on one machine.
Usage::

    python benchmarks/bench_loop_memory.py [--data DIR] [--grid 500 2000 8000] [--m 5] \
        [--shards 2 1] [--paradigms replace] [--side 8] [--out results.json] [--readme]
    python benchmarks/bench_loop_memory.py --quick --out results.json   # seconds, tiny B
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from loop_memory_report import SECTION, _section, summarize
from proc_tree import TreeRss, settle, status
from readme_section import update_readme

HERE = Path(__file__).resolve().parent
RESULT = "BENCH_LOOP_MEMORY "  # the --case subprocess's result line
STAGE_LINE = re.compile(r"\] iteration (\d+) (\w+) \.\.\.$")


# -- the real data set --------------------------------------------------------------------------


def write_real(folder: Path, rows: int, side: int, seed: int = 0) -> Path:
    """``rows`` distinct grayscale PNGs (``side x side``) with labels as one Parquet file:
    sklearn digits upscaled, shifted by up to 2 pixels, mixed 80/20 with another digit, noised."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    out = folder / "part-00000.parquet"
    if out.exists() and pq.read_metadata(out).num_rows == rows:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    base = np.stack(
        [np.asarray(Image.fromarray(im).resize((side, side))) for im in
         np.round(d.images * (255 / 16)).astype(np.uint8)]
    ).astype(np.float32)  # fmt: skip
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(base), rows)
    b = rng.integers(0, len(base), rows)
    img = 0.8 * base[a] + 0.2 * base[b]
    shifts = rng.integers(-2, 3, (rows, 2))
    for i in range(rows):
        img[i] = np.roll(img[i], tuple(shifts[i]), axis=(0, 1))
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    pngs = []
    for im in img:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table(
        {"image": pa.array(pngs, pa.binary()), "label": pa.array(d.target[a], pa.int64())}
    )
    tmp = folder / "part-00000.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out)
    return folder


# -- one run ------------------------------------------------------------------------------------


def overrides(args: argparse.Namespace, b: int, shards: int, paradigm: str, real: Path,
              storage: Path) -> list[str]:  # fmt: skip
    """The ``key=value`` overrides of one run (a cheap loop; see the module docstring)."""
    return [
        "seed=0", "data.source=parquet", f"data.path={real}", f"data.resolution={args.side}",
        "data.channels=1", "model.preset=tiny",
        f"train.steps={args.train_steps}", "train.batch_size=32", "train.warmup_steps=2",
        f"train.log_every={args.train_steps}", "train.checkpoint_every=0", "train.cpu_threads=1",
        "train.sample_grid=0",
        "sample.sampler=ddim", f"sample.steps={args.sample_steps}", "sample.batch_size=256",
        "sample.group_size=256",
        "knn.k=3", f"knn.shards={shards}", "select.method=greedy", "features.name=pixel",
        "loop.iterations=2", f"loop.train_size={b}", f"loop.pool_multiple={args.m}",
        f"loop.paradigm={paradigm}", "loop.metric_features=[pixel]", f"loop.storage={storage}",
        f"resources.generate_actors={args.actors}", f"resources.embed_actors={args.actors}",
    ]  # fmt: skip


def run_case(argv: list[str]) -> None:
    """The ``--case`` subprocess: ``raycollapse run ARGV``, then this process's ``VmHWM``."""
    from raycollapse.cli.main import main as cli_main

    t0 = time.perf_counter()
    rc = cli_main(["run", *argv])
    seconds = time.perf_counter() - t0
    hwm = status(os.getpid()).get("VmHWM", 0)
    print(RESULT + json.dumps({"rc": rc, "driver_hwm": hwm, "seconds": seconds}), flush=True)


def _check_run(storage: Path, b: int) -> dict[str, Any]:
    """What the run wrote: iteration 1's training set size and the metrics rows (a run that
    did not finish is not a measurement)."""
    import pyarrow.parquet as pq

    ts = storage / "iter_001" / "train_set"
    rows = sum(pq.read_metadata(f).num_rows for f in ts.glob("*.parquet"))
    metrics = json.loads((storage / "iter_001" / "metrics.json").read_text())
    secs = {k[len("seconds_") :]: v for k, v in metrics.items() if k.startswith("seconds_")}
    return {"train_set_1_rows": rows, "entropy_train_1": metrics.get("entropy_train"),
            "stage_seconds_1": secs, "ok": rows == b}  # fmt: skip


def measure(args: argparse.Namespace, b: int, shards: int, paradigm: str, env: dict[str, str],
            data: Path) -> dict[str, Any]:  # fmt: skip
    """One whole run as a subprocess, sampled while it runs."""
    real = write_real(data / f"real_{b * args.real_multiple}", b * args.real_multiple, args.side)
    storage = data / "runs" / f"b{b}_s{shards}_{paradigm}"
    if storage.exists():
        shutil.rmtree(storage)  # a finished run would resume as "nothing to do"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", "run", str(HERE.parent / "configs" / "smoke.yaml"),
           *overrides(args, b, shards, paradigm, real, storage)]  # fmt: skip
    settle(os.getpid())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    rss = TreeRss(os.getpid(), proc.pid)
    err: list[str] = []

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            m = STAGE_LINE.search(line.rstrip())
            if m:
                rss.stage = f"{m.group(1)}:{m.group(2)}"

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    assert proc.stdout is not None
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the run goes too
            proc.kill()
            proc.wait()
        rss.stop()
    reader.join()
    res: dict[str, Any] = {"b": b, "m": args.m, "n": round(args.m * b), "shards": shards,
                           "paradigm": paradigm, "real_rows": b * args.real_multiple,
                           "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    line = next((x for x in out.splitlines() if x.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        res["error"] = "".join(err)[-3000:]
        return res
    res.update(json.loads(line[len(RESULT) :]))
    res.update(_check_run(storage, b))
    mb = 2**20
    peaks = sorted(((r, n) for n, r in rss.worker_peak.values()), reverse=True)
    by_name: dict[str, float] = {}
    for n, r in rss.worker_peak.values():
        by_name[n] = max(by_name.get(n, 0.0), r / mb)
    # VmHWM is the kernel's high-water mark, updated lazily (it can miss a peak that was
    # released without an unmap): the larger of it and the sampled RSS
    res.update({
        "driver_hwm_mb": res.pop("driver_hwm") / mb,
        "driver_sampled_peak_mb": rss.driver_rss_peak / mb,
        "worker_max_peak_mb": peaks[0][0] / mb if peaks else 0.0,
        "worker_max_name": peaks[0][1] if peaks else "",
        "workers": len(peaks),
        "workers_sum_peak_mb": rss.workers_sum_peak / mb,
        "ray_system_peak_mb": rss.system_sum_peak / mb,
        "worker_peak_by_name_mb": by_name,
        "by_stage_mb": {k: {kk: vv / mb for kk, vv in v.items()} for k, v in rss.by_stage.items()},
    })  # fmt: skip
    res["driver_peak_mb"] = max(res["driver_hwm_mb"], res["driver_sampled_peak_mb"])
    # one machine: the driver's peak + the workers' summed peak + Ray's own processes
    res["machine_peak_mb"] = (
        res["driver_peak_mb"] + res["workers_sum_peak_mb"] + res["ray_system_peak_mb"]
    )
    if not args.keep:
        shutil.rmtree(storage, ignore_errors=True)
    return res


# -- main ---------------------------------------------------------------------------------------


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def _ray_env(args: argparse.Namespace, temp: str) -> tuple[dict[str, str], bool]:
    """The environment that points a run at the benchmark's Ray, and whether it was started
    here. A Ray this process already runs (a test's session Ray) is used: its raylet and
    workers are this process's descendants too. Otherwise a local Ray of its own, in a private
    temp dir (never another user's through ``RAY_ADDRESS`` or ``auto``: its workers are not
    below this process and would not be counted)."""
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=args.cpus, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, object_store_memory=args.object_store_mb * 2**20,
                 _temp_dir=temp)  # fmt: skip
    env = dict(os.environ)  # after init: it may have set the cluster's auth token there
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return env, started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="work folder (data sets, runs); default a temporary one")
    p.add_argument("--grid", nargs="+", type=int, default=[500, 2000, 8000], help="values of B")
    p.add_argument("--m", type=float, default=5, help="loop.pool_multiple")
    p.add_argument("--shards", nargs="+", type=int, default=[2, 1], help="knn.shards values")
    p.add_argument("--paradigms", nargs="+", default=["replace"],
                   choices=["replace", "accumulate"])  # fmt: skip
    p.add_argument("--side", type=int, default=8, help="image side (grayscale)")
    p.add_argument("--real-multiple", type=int, default=2, help="real images per unit of B")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=1,
                   help="DDIM steps (memory does not depend on them; time does)")  # fmt: skip
    p.add_argument("--actors", type=int, default=1, help="generation and embedding actors")
    p.add_argument("--cpus", type=int, default=4, help="CPUs of the benchmark's Ray")
    p.add_argument("--object-store-mb", type=int, default=300)
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--quick", action="store_true", help="B = 16, 32; shards 2: the cheapest loops")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--readme", action="store_true", help="write the section of README.md")
    p.add_argument(
        "--from-json", help="write the README section from this results JSON; run nothing"
    )
    p.add_argument("--case", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.from_json:  # re-render the README section of a finished measurement
        update_readme(
            HERE / "README.md", SECTION, _section(json.loads(Path(args.from_json).read_text()))
        )
        return {}
    if args.case:
        run_case(args.case[1:])  # "run CONFIG overrides..."
        return {}
    if args.quick:
        args.grid, args.shards, args.train_steps, args.sample_steps = [16, 32], [2], 2, 1
    if any(b < 8 for b in args.grid) or any(s < 1 for s in args.shards) or args.m < 1:
        p.error("--grid values must be >= 8, --shards >= 1 and --m >= 1")
    temp = tempfile.mkdtemp(prefix="rclm", dir="/tmp")  # short: Ray's socket paths have a limit
    data = Path(args.data) if args.data else Path(temp) / "data"
    results: dict[str, Any] = {"uptime_before": _uptime(), "args": vars(args), "cases": [],
                               "commit": _commit()}  # fmt: skip
    import ray

    started = False
    # SIGTERM (kill PID) as Ctrl-C: the run killed and this Ray shut down by the finally below
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        env, started = _ray_env(args, temp)
        for paradigm in args.paradigms:
            for s in args.shards:
                for b in args.grid:
                    case = measure(args, b, s, paradigm, env, data)
                    results["cases"].append(case)
                    print(json.dumps(case), flush=True)
                    if args.out:  # so far, should a later case not finish
                        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if started:
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)  # Ray's session files (and the data without --data)
    results["fits"] = summarize(results["cases"])
    results["uptime_after"] = _uptime()
    print(json.dumps({"fits": results["fits"]}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if args.readme:
        update_readme(HERE / "README.md", SECTION, _section(results))
    return results


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
