"""``make quickstart``: the paper's finding on the embedded digits, on 2 CPU cores.

Runs ``configs/quickstart.yaml`` twice, side by side (one process and one local Ray each, one
CPU thread each): the replace paradigm without selection (pool m = 1) and with greedy selection
(pool m = 2). Then writes the report to ``runs/quickstart/report/index.html`` and prints the
entropy of each training set and the generalization score per iteration, with the two checks of
the paper (Shi et al. 2025): without selection both fall; with greedy selection both end higher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from raycollapse.cli.main import main as cli

VARIANTS = {
    "no_selection": ["select.method=none", "loop.pool_multiple=1"],
    "greedy": ["select.method=greedy", "loop.pool_multiple=2"],
}


def _stream(name: str, proc: subprocess.Popen) -> None:
    """Prefix each progress line of a run with its name, so two runs can share a terminal."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("[raycollapse"):
            print(f"{name:>12} | {line.rstrip()}", flush=True)


def run_variants(config: str, out: Path, extra: list[str]) -> dict[str, Path]:
    procs = {}
    env = {**os.environ, "RAY_ADDRESS": "local"}  # each run its own local Ray, never a stray one
    for name, overrides in VARIANTS.items():
        argv = [sys.executable, "-m", "raycollapse.cli.main", "run", config, *overrides,
                f"loop.storage={out / name}", *extra]  # fmt: skip
        procs[name] = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    threads = [threading.Thread(target=_stream, args=(n, p), daemon=True) for n, p in procs.items()]
    for t in threads:
        t.start()
    failed = [n for n, p in procs.items() if p.wait() != 0]
    for t in threads:
        t.join(timeout=5)
    if failed:
        raise SystemExit(
            f"quickstart: run(s) {', '.join(failed)} failed; re-run `make quickstart` to resume."
        )
    return {n: out / n for n in VARIANTS}


def summarize(runs: dict[str, Path]) -> bool:
    rows = {n: json.loads((p / "metrics.json").read_text()) for n, p in runs.items()}
    keys = ("entropy_train", "generalization_score", "memorized_fraction", "fd_pixel")
    print("\niteration  " + "  ".join(f"{n}:{k}" for n in rows for k in keys[:2]))
    for i in range(len(rows["no_selection"])):
        cells = [f"{rows[n][i][k]:>10.3f}" for n in rows for k in keys[:2]]
        print(f"{i:>9}  " + "  ".join(cells))
    none, greedy = rows["no_selection"], rows["greedy"]
    checks = {
        "without selection, entropy_train falls every iteration": all(
            b["entropy_train"] < a["entropy_train"] for a, b in zip(none, none[1:], strict=False)),
        "without selection, generalization_score falls every iteration": all(
            b["generalization_score"] < a["generalization_score"] for a, b in zip(none, none[1:], strict=False)),
        "with greedy selection, entropy_train is higher at the last iteration":
            greedy[-1]["entropy_train"] > none[-1]["entropy_train"],
        "with greedy selection, generalization_score is higher at the last iteration":
            greedy[-1]["generalization_score"] > none[-1]["generalization_score"],
    }  # fmt: skip
    print()
    for text, ok in checks.items():
        print(f"  [{'yes' if ok else 'NO '}] {text}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="key=value overrides for both runs"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(
        f"quickstart: two runs of {args.config} side by side under {out}/ (progress below)",
        flush=True,
    )
    runs = run_variants(args.config, out, list(args.overrides))
    report = out / "report"
    code = cli(
        [
            "report",
            *(str(p) for p in runs.values()),
            "--out",
            str(report),
            "--title",
            "raycollapse quickstart",
        ]
    )
    if code:
        return code
    ok = summarize(runs)
    print(f"\nruns:   {', '.join(str(p) for p in runs.values())}\nreport: {report / 'index.html'}")
    if not ok:
        print(
            "note: a finding above did not appear in this run; see README (Quickstart) for the calibration."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
