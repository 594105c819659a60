"""The report of a sweep: one self-contained ``index.html`` (and ``summary.json``) from the
sweep's folder, ``<storage>/results.parquet`` and ``<storage>/sweep.yaml``.

The page shows the trials (status, swept values, final objective, the best marked), the objective
against iteration for every trial, the final objective against each swept key, and the Pearson
correlation of ``entropy_train`` and ``generalization_score`` over all trials and iterations with
its scatter plot. ``raycollapse sweep`` writes it into ``<storage>/report/`` at the end;
``raycollapse report SWEEP_DIR`` writes it again. No Ray here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from html import escape
from typing import Any

import yaml

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.report.collect import RunData
from raycollapse.report.correlation import X_METRIC, Y_METRIC, paired, rows_correlation
from raycollapse.sweeps.results import RESULTS_PARQUET, SWEEP_YAML

REPORT_DIR = "report"


@dataclass
class TrialRows:
    """One trial of the results table: its swept values and rows sorted by iteration."""

    trial_id: str
    status: str
    values: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def final(self) -> float | None:
        value = self.rows[-1].get("objective") if self.rows else None
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def is_sweep(path: str) -> bool:
    """Whether ``path`` is a sweep's folder (it holds ``sweep.yaml`` and ``results.parquet``)."""
    try:
        return storage.exists(storage.join(path, SWEEP_YAML)) and storage.exists(
            storage.join(path, RESULTS_PARQUET)
        )
    except OSError:
        return False


def read_sweep(root: str) -> tuple[dict[str, Any], list[str], list[TrialRows]]:
    """The sweep config (plain dict), its swept keys and its trials, from the sweep's folder."""
    from omegaconf import OmegaConf

    from raycollapse.config import Config, to_dict
    from raycollapse.sweeps.space import parse_space

    try:
        saved = yaml.safe_load(storage.read_text(storage.join(root, SWEEP_YAML)))
        table = storage.read_parquet(storage.join(root, RESULTS_PARQUET)).to_pylist()
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserInputError(f"cannot read the sweep in '{root}': {exc}") from None
    sweep = saved["sweep"]
    keys = parse_space(
        sweep.get("space") or {},
        sweep.get("variants") or [],
        to_dict(OmegaConf.structured(Config)),
    ).keys()
    trials: dict[str, TrialRows] = {}
    for row in table:
        tid = str(row["trial_id"])
        if tid not in trials:
            values = {k: row.get(k) for k in keys}
            trials[tid] = TrialRows(tid, str(row["status"]), values, [])
        trials[tid].rows.append(row)
    for t in trials.values():
        t.rows.sort(key=lambda r: r["iteration"])
    return sweep, keys, sorted(trials.values(), key=lambda t: t.trial_id)


def best_trial(trials: list[TrialRows], mode: str) -> TrialRows | None:
    """The best final objective among finished trials (among all when none finished)."""
    ranked = [t for t in trials if t.final is not None]
    pool = [t for t in ranked if t.status == "finished"] or ranked
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda t: t.final)


def sweep_summary(sweep: dict[str, Any], trials: list[TrialRows]) -> dict[str, Any]:
    """``summary.json`` of a sweep report: ``objective`` (metric, mode, reduce), ``best_trial``,
    ``x``, ``y``, ``correlation`` (pooled over all trials and iterations: ``r``, ``n``,
    ``undefined``) and per trial its status, values, final objective and correlation."""
    best = best_trial(trials, str(sweep["objective"]["mode"]))
    return {
        "objective": sweep["objective"],
        "best_trial": best.trial_id if best else None,
        "x": X_METRIC,
        "y": Y_METRIC,
        "correlation": rows_correlation([r for t in trials for r in t.rows]).as_dict(),
        "trials": [
            {
                "trial_id": t.trial_id,
                "status": t.status,
                "values": t.values,
                "iterations": len(t.rows),
                "final_objective": t.final,
                "correlation": rows_correlation(t.rows).as_dict(),
            }
            for t in trials
        ],
    }


def _trials_table(keys: list[str], trials: list[TrialRows], best: TrialRows | None) -> str:
    from raycollapse.report.html import _fmt

    head = "".join(
        f"<th>{escape(h)}</th>" for h in ("trial", "status", *keys, "iterations", "final objective")
    )
    body = []
    for t in trials:
        mark = " <b>(best)</b>" if best is not None and t.trial_id == best.trial_id else ""
        cells = "".join(f"<td>{_fmt(t.values.get(k))}</td>" for k in keys)
        body.append(
            f"<tr><td>{escape(t.trial_id)}{mark}</td><td>{escape(t.status)}</td>{cells}"
            f"<td class='num'>{len(t.rows)}</td><td class='num'>{_fmt(t.final)}</td></tr>"
        )
    return f"<table id='trials'><tr>{head}</tr>{''.join(body)}</table>"


def _figure(png: bytes | None, alt: str, missing: str) -> str:
    from raycollapse.report.html import data_uri

    if png is None:
        return f"<figure><span class='missing'>{escape(missing)}</span></figure>"
    return f"<figure><img src='{data_uri(png)}' alt='{escape(alt)}'></figure>"


def render_sweep(root: str, *, title: str | None = None) -> tuple[str, dict[str, Any]]:
    """The page and ``summary.json`` content of the sweep in ``root``."""
    from raycollapse.report.html import _CSS, correlation_section
    from raycollapse.report.plots import plot_metric, plot_param, plot_scatter

    sweep, keys, trials = read_sweep(root)
    obj = sweep["objective"]
    best = best_trial(trials, str(obj["mode"]))
    as_runs = [RunData(t.trial_id, root, {}, t.rows, []) for t in trials]
    curve = plot_metric("objective", as_runs).png if trials else None
    params = "".join(
        _figure(
            plot_param(
                k, [t.values.get(k) for t in trials], [t.final for t in trials], "objective"
            ),
            f"plot: objective vs {k}",
            f"{k}: no trial has an objective",
        )
        for k in keys
    )
    per_trial = [(t.trial_id, rows_correlation(t.rows)) for t in trials]
    pooled = rows_correlation([r for t in trials for r in t.rows])
    groups = [
        (t.trial_id, *paired([r.get(X_METRIC) for r in t.rows], [r.get(Y_METRIC) for r in t.rows]))
        for t in trials
    ]
    scatter = plot_scatter(groups, X_METRIC, Y_METRIC, f"{Y_METRIC} vs {X_METRIC}")
    title = title or f"raycollapse sweep: {root}"
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    objective = f"{obj['metric']} ({obj['reduce']} over iterations, {obj['mode']})"
    sections = [
        f"<h1>{escape(title)}</h1><p>generated {escape(when)} by <code>raycollapse report</code>; "
        f"{escape(str(sweep['kind']))} trials; objective: <code>{escape(objective)}</code>.</p>",
        f"<h2 id='trials-section'>Trials</h2>{_trials_table(keys, trials, best)}",
        "<h2 id='objective'>Objective by iteration</h2><div class='row'>"
        + _figure(curve, "plot: objective", "no trial reported an objective")
        + "</div>",
        f"<h2 id='params'>Final objective by swept value</h2><div class='row'>{params}</div>",
        "<h2 id='correlation-section'>Entropy and generalization</h2>"
        + correlation_section(per_trial, pooled, scatter, "trial"),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return page, sweep_summary(sweep, trials)


def build_sweep_report(root: str, out: str | None = None, *, title: str | None = None) -> str:
    """Write ``index.html`` and ``summary.json`` of the sweep in ``root`` into ``out``
    (default ``<root>/report``); return the path of ``index.html``."""
    from raycollapse.report import SUMMARY, prepare_out, write_index

    out = out or storage.join(root, REPORT_DIR)
    prepare_out(out)
    page, summary = render_sweep(root, title=title)
    index = write_index(page, out)
    write_index(json.dumps(summary, indent=1, allow_nan=False) + "\n", out, SUMMARY)
    return index
