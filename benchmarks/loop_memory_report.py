"""The figures of ``bench_loop_memory.py``: least-squares growth on B, the 24 GB extrapolation
and its section of ``benchmarks/README.md``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SECTION = "## Memory: a whole loop"
GB24 = 24e9


def fit_b(bs: list[int], ys_mb: list[float]) -> dict[str, float]:
    """Least-squares line of ``ys`` (MiB) on B: bytes per unit of B, intercept (MiB) and the
    largest B under 24 GB (inf where the slope is not positive: no growth measured)."""
    a = np.stack([np.ones(len(bs)), np.asarray(bs, float)], axis=1)
    (c0, c1), *_ = np.linalg.lstsq(a, np.asarray(ys_mb, float) * 2**20, rcond=None)
    max_b = (GB24 - c0) / c1 if c1 > 0 else float("inf")
    return {"bytes_per_b": float(c1), "intercept_mb": float(c0 / 2**20), "max_b_24gb": float(max_b)}


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (shards, paradigm): the fits of the driver, the largest worker, the workers' sum and
    the machine's total (driver + workers + Ray's processes) on B."""
    fits: dict[str, Any] = {}
    groups = sorted({(c["shards"], c["paradigm"]) for c in cases if "error" not in c})
    for s, p in groups:
        cs = [c for c in cases if (c["shards"], c["paradigm"]) == (s, p) and "error" not in c]
        if len({c["b"] for c in cs}) < 2:
            continue
        bs = [c["b"] for c in cs]
        fits[f"shards={s} {p}"] = {
            key: fit_b(bs, [c[f"{key}_mb"] for c in cs])
            for key in ("driver_peak", "worker_max_peak", "workers_sum_peak", "machine_peak")
        } | {"b_range": [min(bs), max(bs)]}
    return fits


def stage_steps(by_stage: dict[str, dict[str, float]]) -> dict[str, float]:
    """How much each stage raised the driver's running peak (MiB), stages in run order: what
    it needed beyond everything before it (RSS is carried from stage to stage)."""
    out, peak = {}, 0.0
    for st, v in by_stage.items():
        out[st] = max(v["driver"] - peak, 0.0)
        peak = max(peak, v["driver"])
    return out


def stage_growth(cases: list[dict[str, Any]]) -> dict[str, float]:
    """Per stage, the change of its step of the driver's peak (``stage_steps``) between the
    smallest and the largest B of ``cases`` (one shards/paradigm group), in bytes per unit of
    B, largest first; the steps add up to the peak, so these add up to its growth."""
    lo, hi = min(cases, key=lambda c: c["b"]), max(cases, key=lambda c: c["b"])
    if hi["b"] == lo["b"]:
        return {}
    s_lo, s_hi = stage_steps(lo["by_stage_mb"]), stage_steps(hi["by_stage_mb"])
    out = {st: (v - s_lo.get(st, 0.0)) * 2**20 / (hi["b"] - lo["b"]) for st, v in s_hi.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _fmt_b(v: float) -> str:
    return "no growth measured" if v == float("inf") else f"{v:,.0f}"


def _section(r: dict[str, Any]) -> str:
    a = r["args"]
    # "command": set where one section joins several runs (their commands, as run)
    cmd = r.get("command") or (
        f"python benchmarks/bench_loop_memory.py --grid {' '.join(map(str, a['grid']))} "
        f"--m {a['m']:g} --shards {' '.join(map(str, a['shards']))} "
        f"--paradigms {' '.join(a['paradigms'])} --side {a['side']} "
        f"--train-steps {a['train_steps']} --sample-steps {a['sample_steps']} --readme"
    )
    lines = [
        SECTION, "",
        f"{cmd if r.get('command') else '`' + cmd + '`'} (commit {r['commit']}; a real `raycollapse run`, 2 iterations, per case, on a Ray "
        f"of the benchmark's own with {a['cpus']} CPUs and a {a['object_store_mb']} MB object store; "
        f"{os.cpu_count()} cores). `uptime` before: `{r['uptime_before']}`; after: "
        f"`{r['uptime_after']}` (the host is shared: times are rough, memory is not).", "",
        f"Each run: {a['real_multiple']} x B real {a['side']}x{a['side']} grayscale images (Parquet), "
        "the tiny UNet, iteration 1 selecting B of m x B candidates greedily (pixel features), "
        "generation and embedding on one Ray actor each. Driver: the CLI process's peak RSS "
        "(VmHWM, or the 0.2 s samples where larger). Workers: the `ray::` processes of the "
        "benchmark's Ray, sampled every 0.2 s (the largest one, and the peak of their sum); Ray: "
        "its own processes (raylet, GCS, agents). Machine = driver + workers' sum + Ray.", "",
        "| shards | paradigm | B | N = m B | run s | driver peak MB (stage) | largest worker MB "
        "| workers' sum MB | Ray's processes MB | machine MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for c in r["cases"]:
        if "error" in c:
            lines.append(
                f"| {c['shards']} | {c['paradigm']} | {c['b']} | {c['n']} | failed | | | | | |"
            )
            continue
        top = max(c["by_stage_mb"].items(), key=lambda kv: kv[1]["driver"])[0]
        lines.append(
            f"| {c['shards']} | {c['paradigm']} | {c['b']} | {c['n']} | {c['seconds']:.0f} | "
            f"{c['driver_peak_mb']:.0f} ({top}) | {c['worker_max_peak_mb']:.0f} "
            f"({c['worker_max_name']}) | {c['workers_sum_peak_mb']:.0f} | "
            f"{c['ray_system_peak_mb']:.0f} | {c['machine_peak_mb']:.0f} |"
        )
    lines.append("")
    for group, f in r["fits"].items():
        d, w, ws, mc = (f[k] for k in ("driver_peak", "worker_max_peak", "workers_sum_peak",
                                       "machine_peak"))  # fmt: skip
        cs = [
            c
            for c in r["cases"]
            if "error" not in c and f"shards={c['shards']} {c['paradigm']}" == group
        ]
        growth = ", ".join(f"{st} {v:.0f}" for st, v in list(stage_growth(cs).items())[:3])
        lines.append(
            f"- {group} (least squares over B = {f['b_range'][0]}..{f['b_range'][1]}, m = "
            f"{a['m']:g}): driver {d['bytes_per_b']:.0f} bytes per unit of B over "
            f"{d['intercept_mb']:.0f} MB; largest worker {w['bytes_per_b']:.0f} over "
            f"{w['intercept_mb']:.0f} MB; workers' sum {ws['bytes_per_b']:.0f} over "
            f"{ws['intercept_mb']:.0f} MB; machine {mc['bytes_per_b']:.0f} over "
            f"{mc['intercept_mb']:.0f} MB. Extrapolated to 24 GB: the driver alone B <= "
            f"{_fmt_b(d['max_b_24gb'])}; driver + workers + Ray on one machine B <= "
            f"{_fmt_b(mc['max_b_24gb'])}. Where the driver's peak grows (bytes per unit of B by the "
            f"stage that raised its running peak, sampled, largest first): {growth}."
        )
    for group in r["fits"]:
        cs = [
            c
            for c in r["cases"]
            if "error" not in c and f"shards={c['shards']} {c['paradigm']}" == group
        ]
        big = max(cs, key=lambda c: c["b"])
        names = ", ".join(
            f"`{n}` {v:.0f}"
            for n, v in sorted(big["worker_peak_by_name_mb"].items(), key=lambda kv: -kv[1])
        )
        lines.append(f"- {group}, B = {big['b']}: peak MB per worker kind: {names}.")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = (
    "What the figures hold. The driver trains in its own process (`train.launcher=auto`, one "
    "CPU worker): torch and the model put it at ~1 GB from iteration 0's `train` on, whatever "
    "B; the generation actor (torch, the model, Ray Data; `.submit` is the same actor while it "
    "runs a task) is the largest worker at ~1.1 GB; Ray Data's helper actors (stats, "
    "autoscaling coordinator, location tracker) and Ray's own processes add ~1.2 GB more. These "
    "fixed costs dominate the machine's total at every B measured, and the workers' figures "
    "do not grow with B here (their slopes are noise). Stage `start` is the CLI up to its first "
    "stage: imports, reading the real data set, joining Ray. What grows with B on the driver: "
    "the real data set, held whole for the whole run (`load_records`: real rows x side^2 x "
    "channels bytes, plus Python objects while it is read), the training set, read whole by "
    "the in-process trainer (B images), and the metrics stage: the pool is read in chunks of "
    "8 MiB of vectors (32768 rows at d = 64, so at these N one chunk is the whole pool and this "
    "growth stops beyond N = 32768), float64 and kNN temporaries, PRDC against the whole real "
    "set's embeddings, and with `knn.shards = 1` the whole pool's vectors and a FAISS copy. The "
    "data here are 8x8 grayscale (64 bytes an image, d = 64): what is held per real and per "
    "training image scales with the image size (3072 bytes at 32x32 RGB: ~9 KB per unit of B "
    "for 2 B real images and B training images). Over this range of B the slopes are tens of "
    "MB against allocator noise of the same order: the 24 GB extrapolations are an order of "
    "magnitude, not a limit."
)
