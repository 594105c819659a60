"""Vector runs (``data.source=mog``) in the report: scatter plots and the entropy trajectory
against the memorization limit (docs/design.md, "Mixture of Gaussians").

- :func:`scatter_png`: real data (grey), a training set and a pool in the first two coordinates
  (the loop's ``samples.png`` of a vector run, ``loop.measure.write_samples_png``);
- :func:`trajectory_png`: ``entropy_train`` against iteration for each run, the true entropy of
  the mixture, and each run's memorization reference (``diffusion.empirical``);
- :func:`mog_section`: the report section for the vector runs among a report's runs ("" if none).

matplotlib is drawn on an explicit Agg canvas, as in ``report.plots``.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _figure(size: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _xy(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=np.float64)
    return p[:, 0], (p[:, 1] if p.shape[1] > 1 else np.zeros(len(p)))


def scatter_png(
    real: np.ndarray, train: np.ndarray, pool: np.ndarray, *, title: str, dpi: int = 100
) -> bytes:
    """A scatter plot (PNG) of the real data, a training set and a pool (first two coordinates;
    one coordinate is drawn against 0)."""
    fig = _figure((3.6, 3.4), dpi)
    ax = fig.add_subplot()
    ax.scatter(*_xy(real), s=3, c="0.8", label=f"real ({len(real)})", linewidths=0)
    ax.scatter(
        *_xy(pool), s=6, c="tab:orange", alpha=0.6, label=f"pool ({len(pool)})", linewidths=0
    )
    ax.scatter(*_xy(train), s=8, facecolors="none", edgecolors="tab:blue", linewidths=0.6,
               label=f"training set ({len(train)})")  # fmt: skip
    dim = np.asarray(real).shape[1]
    ax.set_title(title + ("" if dim <= 2 else f" (coordinates 1-2 of {dim})"), fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best", frameon=False, markerscale=1.5)
    return _png(fig)


def trajectory_png(
    runs: Sequence[tuple[str, list[dict[str, Any]]]],
    references: Sequence[tuple[str, list[dict[str, Any]]]],
    entropy_true: float | None,
    *,
    dpi: int = 100,
) -> bytes:
    """``entropy_train`` against iteration: one solid line per run, one dashed line per
    memorization reference, and the true entropy as a horizontal line."""
    fig = _figure((5.4, 3.6), dpi)
    ax = fig.add_subplot()
    for j, (name, rows) in enumerate(runs):
        xs = [int(r["iteration"]) for r in rows]
        ys = [_num(r.get("entropy_train")) for r in rows]
        ax.plot(xs, ys, marker=_MARKERS[j % len(_MARKERS)], markersize=4, label=name)
    for j, (name, rows) in enumerate(references):
        xs = [int(r["iteration"]) for r in rows]
        ys = [_num(r.get("entropy_train")) for r in rows]
        ax.plot(xs, ys, linestyle="--", marker=_MARKERS[j % len(_MARKERS)], markersize=3,
                alpha=0.7, label=f"{name}: memorization limit")  # fmt: skip
    if entropy_true is not None:
        ax.axhline(entropy_true, color="k", linewidth=1, label="true entropy of the mixture")
    ax.set_xlabel("iteration", fontsize=9)
    ax.set_ylabel("entropy_train (nats)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="best", frameon=False)
    return _png(fig)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def reference_rows(run_path: str, config: dict[str, Any], iterations: int) -> list[dict[str, Any]]:
    """The memorization reference of a run: ``memorization_reference`` from its iteration-0
    training set with its selection, pool multiple, k, sampler and seed (replace paradigm)."""
    from raycollapse.diffusion.empirical import memorization_reference
    from raycollapse.diffusion.sampling import make_scheduler
    from raycollapse.loop import layout
    from raycollapse.loop.catalog import Catalog, read_train_refs

    cat = Catalog(run_path, 1)
    train0, _ = cat.gather_images(read_train_refs(layout.iter_path(run_path, 0, layout.TRAIN_SET)))
    scheduler = make_scheduler(
        int(_get(config, "diffusion.num_train_timesteps", 1000)),
        float(_get(config, "diffusion.beta_start", 1e-4)),
        float(_get(config, "diffusion.beta_end", 0.02)),
    )
    return memorization_reference(
        train0, scheduler, iterations=iterations,
        pool_multiple=float(_get(config, "loop.pool_multiple", 2.0)),
        method=str(_get(config, "select.method", "none")), k=int(_get(config, "knn.k", 3)),
        eps=float(_get(config, "knn.eps", 1e-10)), seed=int(_get(config, "seed", 0)),
        sampler=str(_get(config, "sample.sampler", "ddim")), steps=int(_get(config, "sample.steps", 50)),
        sample_eta=float(_get(config, "sample.eta", 0.0)),
        group_size=int(_get(config, "sample.group_size", 64)),
        tau0=_get(config, "select.tau0"), decay=float(_get(config, "select.decay", 0.9)),
    )  # fmt: skip


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def mog_section(runs: Sequence[Any]) -> str:
    """The "Mixture of Gaussians" section for the runs (``report.collect.RunData``) whose metric
    rows have ``entropy_true``; "" when there is none. Replace-paradigm runs get their
    memorization reference (the loop with the fully fitted model) beside their trajectory."""
    vector_runs = [r for r in runs if any("entropy_true" in row for row in r.rows)]
    if not vector_runs:
        return ""
    refs: list[tuple[str, list[dict[str, Any]]]] = []
    notes: list[str] = []
    for run in vector_runs:
        if _get(run.config, "loop.paradigm") != "replace":
            notes.append(f"{run.name}: no memorization reference (paradigm is not replace)")
            continue
        try:
            refs.append((run.name, reference_rows(run.path, run.config, len(run.rows))))
        except (OSError, ValueError, KeyError) as exc:
            notes.append(f"{run.name}: no memorization reference ({exc})")
    truth = {round(float(r.rows[0]["entropy_true"]), 9) for r in vector_runs}
    png = trajectory_png(
        [(r.name, r.rows) for r in vector_runs], refs, truth.pop() if len(truth) == 1 else None
    )
    table = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(f"<td>{_num(row['entropy_train']):.3f}</td>" for row in rows)
        + "</tr>"
        for name, rows in refs
    )
    return (
        "<h2 id='mog'>Mixture of Gaussians</h2><p>entropy_train of each run (solid), of the same "
        "loop with the fully fitted model, which generates only training points (dashed: the "
        "memorization limit), and the true entropy of the mixture (black).</p>"
        + _img(png, "entropy trajectory against the memorization limit")
        + (f"<table><tr><th>memorization limit</th><th colspan=99>entropy_train by iteration</th></tr>{table}</table>" if table else "")
        + "".join(f"<p class='missing'>{escape(n)}</p>" for n in notes)
    )  # fmt: skip
