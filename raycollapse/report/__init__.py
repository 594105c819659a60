"""Reports of loop runs: one self-contained ``index.html`` comparing runs.

- :mod:`raycollapse.report.collect` reads run folders into plain data (never fails on a partial run),
- :mod:`raycollapse.report.plots` draws one PNG per metric (matplotlib, Agg, imported lazily),
- :mod:`raycollapse.report.html` renders the page with every image embedded.

No Ray here: a report runs on a laptop against copied or mounted run folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.atomic import atomic_path

INDEX = "index.html"
SUMMARY = "summary.json"


def prepare_out(out: str) -> str:
    """Create the output folder and check it is writable; return the ``index.html`` path.

    Called before any work so a bad ``--out`` fails in a second, not after the plots.
    """
    if "://" in out:
        try:
            storage.makedirs(out)
        except OSError as exc:
            raise UserInputError(
                f"cannot create output folder '{out}': {exc}. Pass a writable --out."
            ) from None
        return storage.join(out, INDEX)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError / NotADirectoryError / PermissionError
        raise UserInputError(
            f"cannot create output folder '{out}': {exc.strerror or exc}. Pass a writable folder as --out."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(
            f"output folder '{out}' is not writable; pass a writable folder as --out."
        )
    return str(folder / INDEX)


def write_index(text: str, out: str, name: str = INDEX) -> str:
    """Write ``name`` (``index.html``) under ``out`` atomically (temp name + rename); return its
    path."""
    target = prepare_out(out)
    if name != INDEX:
        target = storage.join(out, name) if "://" in out else str(Path(out) / name)
    try:
        if "://" in target:
            storage.write_text_atomic(target, text)
        else:
            with atomic_path(target) as tmp:
                tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserInputError(
            f"cannot write '{target}': {exc}. Pass a writable folder as --out."
        ) from None
    return target


def build_report(
    runs: Sequence[str], out: str, *, max_pairs: int = 8, title: str | None = None
) -> str:
    """Read ``runs``, plot their metrics, write ``out/index.html`` and ``out/summary.json``;
    return the path of ``index.html``.

    ``summary.json`` (see :func:`run_summary`): per run its last iteration's metrics and the
    Pearson r of ``entropy_train`` against ``generalization_score`` with its n; the same pooled
    over all runs. Raises ``UserInputError`` for a path that is not a run folder or an
    unwritable ``out``.
    """
    from raycollapse.report.collect import collect_runs
    from raycollapse.report.correlation import X_METRIC, Y_METRIC, paired, rows_correlation
    from raycollapse.report.html import correlation_section, render
    from raycollapse.report.plots import plot_all, plot_scatter

    if not runs:
        raise UserInputError("no runs given; pass one or more run folders.")
    prepare_out(out)
    data = collect_runs([str(r) for r in runs], max_pairs=max_pairs)
    summary = run_summary(data)
    per_run = [(r.name, rows_correlation(r.rows)) for r in data]
    pooled = rows_correlation([row for r in data for row in r.rows])
    scatter = plot_scatter(
        [
            (r.name, *paired([x.get(X_METRIC) for x in r.rows], [x.get(Y_METRIC) for x in r.rows]))
            for r in data
        ],
        X_METRIC,
        Y_METRIC,
        f"{Y_METRIC} vs {X_METRIC}",
    )
    page = render(
        data,
        plot_all(data),
        title=title,
        correlation=correlation_section(per_run, pooled, scatter, "run"),
    )
    index = write_index(page, out)
    write_index(json.dumps(summary, indent=1, allow_nan=False) + "\n", out, SUMMARY)
    return index


def run_summary(runs: Sequence[Any]) -> dict[str, Any]:
    """``summary.json`` of a run report: ``x``, ``y`` (the metric names), ``correlation`` (pooled
    over all runs: ``r``, ``n``, ``undefined``), and ``runs``: per run ``name``, ``path``,
    ``iterations_finished``, ``iterations_planned``, ``last`` (its last metrics row, as the
    "Last iteration" table) and ``correlation``. Undefined values are null, never NaN."""
    from raycollapse.report.correlation import X_METRIC, Y_METRIC, rows_correlation

    return {
        "x": X_METRIC,
        "y": Y_METRIC,
        "correlation": rows_correlation([row for r in runs for row in r.rows]).as_dict(),
        "runs": [
            {
                "name": r.name,
                "path": r.path,
                "iterations_finished": r.iterations_finished,
                "iterations_planned": r.iterations_planned,
                "last": r.last_row,
                "correlation": rows_correlation(r.rows).as_dict(),
            }
            for r in runs
        ],
    }


__all__ = ["INDEX", "SUMMARY", "build_report", "prepare_out", "run_summary", "write_index"]
