"""Render collected runs and their plots as one self-contained HTML page.

Every image is embedded as a ``data:image/png;base64`` URI, so ``index.html`` can be mailed,
attached to an issue or opened from a bucket without its run folders. Every string from a run
(names, paths, config values, notes) goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
from collections.abc import Sequence
from html import escape

from PIL import Image, UnidentifiedImageError

from raycollapse.report.collect import IterationData, NearestPair, RunData, config_value
from raycollapse.report.correlation import X_METRIC, Y_METRIC, Correlation
from raycollapse.report.plots import GROUPS, MetricPlot
from raycollapse.report.scatter import mog_section

# Config values shown in the runs table: (column title, dotted key).
RUN_COLUMNS = (
    ("paradigm", "loop.paradigm"),
    ("selection", "select.method"),
    ("pool multiple", "loop.pool_multiple"),
    ("train size", "loop.train_size"),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 0.8em; }
img { image-rendering: pixelated; }  /* keep tiny images crisp when the browser scales them */
.missing { color: #a40; font-style: italic; }
.pair { border: 1px solid #ddd; padding: 0.3em; }
.pair .imgs { display: flex; gap: 0.5em; justify-content: center; }
.memorized { color: #b00; font-weight: bold; }
.notes { color: #a40; font-size: 0.9em; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def upscaled_png(data: bytes, min_side: int) -> bytes | None:
    """PNG bytes scaled up by a whole factor with NEAREST so the short side is ≥ ``min_side``.

    Tiny images (8×8 digits) would be dots on the page; whole-factor NEAREST keeps every pixel a
    crisp square even where CSS ``image-rendering`` is ignored. ``None`` when not decodable.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            short = min(img.size)
            if short <= 0:
                return None
            if short >= min_side:
                return data
            factor = math.ceil(min_side / short)
            big = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


def _img(data: bytes | None, alt: str, min_side: int, what: str) -> str:
    png = upscaled_png(data, min_side) if data is not None else None
    if png is None:
        reason = "missing" if data is None else "unreadable"
        return f'<span class="missing">{escape(what)} {reason}</span>'
    return f'<img src="{data_uri(png)}" alt="{escape(alt)}">'


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else ("—" if math.isnan(value) else f"{value:.4g}")
    return escape(str(value))


def _runs_table(runs: Sequence[RunData]) -> str:
    head = "".join(
        f"<th>{escape(t)}</th>"
        for t in ("run", *(c for c, _ in RUN_COLUMNS), "iterations finished", "path")
    )
    body = []
    for run in runs:
        planned = run.iterations_planned
        done = f"{run.iterations_finished}" + (f" of {planned}" if planned is not None else "")
        cells = "".join(f"<td>{_fmt(config_value(run.config, key))}</td>" for _, key in RUN_COLUMNS)
        body.append(
            f"<tr><td>{escape(run.name)}</td>{cells}<td class='num'>{escape(done)}</td>"
            f"<td><code>{escape(run.path)}</code></td></tr>"
        )
    notes = []
    for run in runs:
        if run.notes:
            items = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
            notes.append(
                f"<p><b>{escape(run.name)}</b>: missing or unfinished</p><ul class='notes'>{items}</ul>"
            )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{''.join(notes)}"


def _summary_table(runs: Sequence[RunData], metrics: Sequence[str]) -> str:
    """The last finished iteration's metrics, one column per run (metrics are many, runs few)."""
    head = "<th>metric</th>" + "".join(f"<th>{escape(r.name)}</th>" for r in runs)
    rows = [
        "<tr><td>iteration</td>"
        + "".join(f"<td class='num'>{_fmt(r.last_row.get('iteration'))}</td>" for r in runs)
        + "</tr>"
    ]
    for m in metrics:
        cells = "".join(f"<td class='num'>{_fmt(r.last_row.get(m))}</td>" for r in runs)
        rows.append(f"<tr><td>{escape(m)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _plots(plots: Sequence[MetricPlot]) -> str:
    out = []
    for group in GROUPS:
        members = [p for p in plots if p.group == group]
        if not members:
            continue
        figs = []
        for p in members:
            if p.png is None:
                figs.append(
                    f"<figure><span class='missing'>{escape(p.metric)}: no values in any run</span></figure>"
                )
                continue
            caption = f"{escape(p.metric)} — runs: {escape(', '.join(p.runs))}"
            figs.append(
                f"<figure><img src='{data_uri(p.png)}' alt='plot: {escape(p.metric)}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
        out.append(f"<h3>{escape(group)}</h3><div class='row'>{''.join(figs)}</div>")
    return "".join(out) or "<p class='missing'>no metrics yet</p>"


def _samples(run: RunData) -> str:
    figs = [
        f"<figure>{_img(it.samples_png, f'{run.name} samples iteration {it.iteration}', 192, 'samples.png')}"
        f"<figcaption>iteration {it.iteration}</figcaption></figure>"
        for it in run.iterations
    ]
    return f"<h3>{escape(run.name)}</h3><div class='row'>{''.join(figs) or '<span class=missing>no iterations</span>'}</div>"


def _pair(run: RunData, it: IterationData, pair: NearestPair) -> str:
    label = f"{run.name} iteration {it.iteration} gen {pair.gen_id}"
    mem = " <span class='memorized'>memorized</span>" if pair.memorized else ""
    return (
        "<figure class='pair'><div class='imgs'>"
        f"<div>{_img(pair.gen_image, label + ' generated', 64, 'generated image')}"
        f"<br>generated {pair.gen_id}</div>"
        f"<div>{_img(pair.train_image, label + ' nearest training ' + str(pair.train_id), 64, 'training image')}"
        f"<br>train {pair.train_id}</div></div><figcaption>"
        f"d1 = {_fmt(pair.d1)}<br>d1/d2 = {_fmt(pair.ratio)}{mem}</figcaption></figure>"
    )


def _memorized(run: RunData) -> str:
    parts = [f"<h3>{escape(run.name)}</h3>"]
    for it in run.iterations:
        if it.nearest:
            strip = "".join(_pair(run, it, p) for p in it.nearest)
        else:
            what = next((m for m in it.missing if m.startswith("nearest")), "no pairs")
            strip = f"<span class='missing'>{escape(what)}</span>"
        parts.append(f"<h4>iteration {it.iteration}</h4><div class='row'>{strip}</div>")
    return "".join(parts)


def correlation_section(
    per_group: Sequence[tuple[str, Correlation]],
    pooled: Correlation,
    scatter: bytes | None,
    what: str,
) -> str:
    """Pearson's r of ``entropy_train`` against ``generalization_score``: a table (one row per
    run or trial, then all of them pooled) and the scatter plot. An undefined r says why."""
    head = f"<tr><th>{escape(what)}</th><th>r</th><th>n</th></tr>"

    def row(name: str, c: Correlation, cls: str = "") -> str:
        r = _fmt(c.r) if c.r is not None else f"undefined: {escape(c.reason or '')}"
        return f"<tr{cls}><td>{escape(name)}</td><td class='num'>{r}</td><td class='num'>{c.n}</td></tr>"

    rows = "".join(row(name, c) for name, c in per_group)
    rows += row(f"all {what}s", pooled, " class='pooled'")
    img = (
        f"<figure><img src='{data_uri(scatter)}' alt='scatter: {X_METRIC} vs {Y_METRIC}'>"
        f"<figcaption>{escape(pooled.text())} over all {escape(what)}s and iterations</figcaption></figure>"
        if scatter is not None
        else f"<p class='missing'>no iteration has both {X_METRIC} and {Y_METRIC}</p>"
    )
    return (
        f"<p>Pearson correlation of <code>{X_METRIC}</code> (x) and <code>{Y_METRIC}</code> (y) "
        f"over iterations (the paper reports r = 0.91).</p>"
        f"<div class='row'><table id='correlation'>{head}{rows}</table>{img}</div>"
    )


def render(
    runs: Sequence[RunData],
    plots: Sequence[MetricPlot],
    *,
    title: str | None = None,
    correlation: str = "",
) -> str:
    """The whole page as a string; ``correlation``: the section of :func:`correlation_section`."""
    title = title or "raycollapse report: " + ", ".join(r.name for r in runs)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    metrics = [p.metric for p in plots]
    sections = [
        f"<h1>{escape(title)}</h1><p>generated {escape(when)} by <code>raycollapse report</code>. "
        "Generated image | nearest training image; memorized when d1 &lt; d2/3.</p>",
        "<nav><a href='#runs'>runs</a> · <a href='#summary'>last iteration</a> · "
        "<a href='#correlation-section'>entropy vs generalization</a> · "
        "<a href='#plots'>metrics</a> · <a href='#samples'>samples</a> · <a href='#memorized'>most memorized</a></nav>",
        f"<h2 id='runs'>Runs</h2>{_runs_table(runs)}",
        f"<h2 id='summary'>Last iteration</h2>{_summary_table(runs, metrics)}",
        "<h2 id='correlation-section'>Entropy and generalization</h2>" + correlation,
        f"<h2 id='plots'>Metrics by iteration</h2>{_plots(plots)}",
        "<h2 id='samples'>Samples by iteration</h2>" + "".join(_samples(r) for r in runs),
        "<h2 id='memorized'>Most memorized samples</h2>" + "".join(_memorized(r) for r in runs),
        mog_section(runs),  # "" unless a run is on a mixture of Gaussians
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
