"""The outputs of a sweep, without Ray: the results table, ``best.yaml`` and the summary.

``<storage>/results.parquet`` and ``results.csv``: one row per trial and iteration, with columns
``trial_id``, ``status``, ``iteration``, every swept key (lists as JSON text), every metric the
trial reported and ``objective``. ``<storage>/best.yaml``: the full loop config of the best trial,
ready for ``raycollapse run`` (for loop trials its ``loop.storage`` is the trial's run folder, so
that command resumes or extends that very run).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import yaml

from raycollapse.io import storage

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
BEST_YAML = "best.yaml"
SWEEP_YAML = "sweep.yaml"
STATUSES = ("finished", "stopped_early", "errored", "pending")


@dataclass
class TrialRecord:
    """One trial as the sweep saw it.

    ``values``: its swept keys; ``config``: its full loop config (plain dict); ``rows``: one dict
    per reported iteration (``iteration``, the metrics, ``objective``); ``status``: one of
    :data:`STATUSES` (stopped_early: ended by the scheduler before its last iteration).
    """

    trial_id: str
    values: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "pending"
    error: str | None = None

    @property
    def final(self) -> float:
        """The objective after the trial's last reported iteration (NaN when none)."""
        if not self.rows:
            return math.nan
        value = self.rows[-1].get("objective")
        return float(value) if value is not None else math.nan


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_table(records: list[TrialRecord], keys: list[str]) -> pa.Table:
    """One row per trial and iteration: trial_id, status, iteration, ``keys``, metrics, objective."""
    metric_cols: list[str] = []
    for rec in records:
        for row in rec.rows:
            metric_cols += [
                k for k in row if k not in metric_cols and k not in ("iteration", "objective")
            ]
    fixed = ["trial_id", "status", "iteration", *keys]
    metric_cols = sorted(c for c in metric_cols if c not in fixed)
    columns: dict[str, list[Any]] = {c: [] for c in [*fixed, *metric_cols, "objective"]}
    for rec in records:
        for row in rec.rows:
            columns["trial_id"].append(rec.trial_id)
            columns["status"].append(rec.status)
            columns["iteration"].append(int(row["iteration"]))
            for k in keys:
                columns[k].append(_cell(rec.values.get(k)))
            for c in [*metric_cols, "objective"]:
                columns[c].append(_cell(row.get(c)))
    return pa.table(columns)


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial with the best final objective among the finished ones (among all trials that
    reported one when none finished); ``None`` when no trial has a defined objective."""
    ranked = [r for r in records if math.isfinite(r.final)]
    finished = [r for r in ranked if r.status == "finished"]
    pool = finished or ranked
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r.final)


def write_results(
    records: list[TrialRecord], keys: list[str], mode: str, root: str
) -> dict[str, Any]:
    """Write the table (Parquet, CSV) and ``best.yaml`` under ``root``; return the summary:
    trials, finished, stopped_early, errored, best_trial, best_value, best_config, results, best."""
    table = results_table(records, keys)
    storage.write_parquet_atomic(table, storage.join(root, RESULTS_PARQUET))
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes_atomic(storage.join(root, RESULTS_CSV), buf.getvalue())
    best = best_record(records, mode)
    best_uri = storage.join(root, BEST_YAML)
    if best is not None:
        storage.write_text_atomic(best_uri, yaml.safe_dump(best.config, sort_keys=False))
    count = {s: sum(r.status == s for r in records) for s in STATUSES}
    return {
        "trials": len(records),
        "finished": count["finished"],
        "stopped_early": count["stopped_early"],
        "errored": count["errored"],
        "best_trial": best.trial_id if best else None,
        "best_value": best.final if best else None,
        "best_config": best.values if best else None,
        "results": storage.join(root, RESULTS_PARQUET),
        "best": best_uri if best else None,
    }
