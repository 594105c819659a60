"""`raycollapse report`: two fake runs (one unfinished) -> index.html, checked as HTML and in Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import report_summary
from PIL import Image

from raycollapse.cli.main import main
from raycollapse.loop import layout
from raycollapse.report.collect import collect_run, unique_names

ITERATIONS = 3
# (d1, d2) of the nearest pairs of every iteration: unsorted; two clearly memorized, one clearly
# not, one exactly at d1 = d2/3 (not memorized: the definition is strict) and one an ulp below
# d2/3, where d1/d2 < 1/3 would still say "not memorized".
D2_EDGE = 0.5056378869683275
NEAREST_D = [
    (0.3, 1.5),
    (0.1, 1.0),
    (2.0, 2.5),
    (1.0, 3.0),
    (float(np.nextafter(D2_EDGE / 3, 0)), D2_EDGE),
]


def _png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _make_run(root: Path, name: str, seed: int, *, finished: int, paradigm: str) -> Path:
    """A run folder in the layout: rows for ``finished`` iterations; iteration 2 always has a folder."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "loop": {
            "iterations": ITERATIONS,
            "paradigm": paradigm,
            "pool_multiple": 2.0,
            "train_size": 64,
        },
        "select": {"method": "greedy"},
    }
    (run / layout.CONFIG).write_text(yaml.safe_dump(cfg))
    rows = []
    for i in range(finished):
        row = {
            "iteration": i,
            "entropy_train": 5.0 - i * 0.5 + seed * 0.1,
            "entropy_generated": 4.5 - i * 0.6,
            "generalization_score": 1.0 / (i + 1),
            "memorized_fraction": 0.1 * i,
            "fd_pixel": 10.0 + i,
            "fid": None,  # no Inception weights offline: null in every row
            "precision": 0.8,
            "share_real": 1.0 if i == 0 else 0.5,
            "seconds_train": 3.0 + i,
        }
        rows.append(row)
        Path(layout.iter_dir(str(run), i)).mkdir()
        Path(layout.iter_path(str(run), i, layout.ITER_METRICS)).write_text(json.dumps(row))
    (run / layout.METRICS_JSON).write_text(json.dumps(rows))
    for i in range(ITERATIONS):
        Path(layout.iter_dir(str(run), i)).mkdir(exist_ok=True)
        if i >= finished:
            continue  # the unfinished iteration: folder exists, files do not
        grid = rng.integers(0, 256, (4 * 10, 4 * 10), dtype=np.uint8)
        Image.fromarray(grid, mode="L").save(layout.iter_path(str(run), i, layout.SAMPLES_PNG))
        n = len(NEAREST_D)
        table = pa.table(
            {
                "gen_id": pa.array(range(n), pa.int64()),
                "train_id": pa.array(range(100, 100 + n), pa.int64()),
                "d1": pa.array([d1 for d1, _ in NEAREST_D]),
                "d2": pa.array([d2 for _, d2 in NEAREST_D]),
                "gen_image": pa.array([_png(rng, 8) for _ in range(n)], pa.binary()),
                "train_image": pa.array([_png(rng, 8) for _ in range(n)], pa.binary()),
            }
        )
        pq.write_table(table, layout.iter_path(str(run), i, layout.NEAREST))
    return run


class _Imgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two runs: 'alpha' finished, 'beta' with its last iteration unfinished; one report."""
    root = tmp_path_factory.mktemp("report")
    alpha = _make_run(root / "runs", "alpha", 0, finished=3, paradigm="replace")
    beta = _make_run(root / "runs", "beta<b>", 1, finished=2, paradigm="accumulate")
    out = root / "out"
    code = main(["report", str(alpha), str(beta), "--out", str(out)])
    assert code == 0
    index = out / "index.html"
    return index, index.read_text(encoding="utf-8")


def test_html_images_plots_tables(report):
    index, text = report
    parser = _Imgs()
    parser.feed(text)
    assert len(parser.imgs) > 10
    for img in parser.imgs:
        src = img["src"] or ""
        if src.startswith("data:image/png;base64,"):
            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
                im.load()
                assert min(im.size) >= 64  # tiny images are upscaled to be visible
        else:
            assert (index.parent / src).is_file(), src
    alts = {img["alt"] for img in parser.imgs}
    for metric in (
        "entropy_train",
        "entropy_generated",
        "generalization_score",
        "memorized_fraction",
        "fd_pixel",
        "precision",
        "share_real",
        "seconds_train",
    ):
        assert f"plot: {metric}" in alts
    assert "fid: no values in any run" in text  # all-null metric is reported, not plotted
    # names in tables and plot captions, escaped
    assert "beta&lt;b&gt;" in text and "beta<b>" not in text
    assert re.search(r"runs: alpha, beta&lt;b&gt;", text)
    assert "accumulate" in text and "greedy" in text
    assert "2 of 3 iterations finished" in text
    assert "iteration 2: samples.png missing" in text
    assert "iteration 2: nearest.parquet missing" in text
    # sample grids: alpha 3 iterations + beta 2; memorized pairs: 5 per finished iteration
    assert sum("samples iteration" in (a or "") for a in alts) == 5
    assert sum(" generated" in (img["alt"] or "") for img in parser.imgs) == 5 * len(NEAREST_D)
    # the page carries no script: nothing but the report runs in a reader's browser
    assert "<script" not in text.lower() and "image-check" not in text


def _pairs(page: str) -> dict[tuple[str, int, int], bool]:
    """Every nearest pair on the page: (run, iteration, gen id) -> marked memorized."""
    out = {}
    for fig in re.findall(r"<figure class='pair'>(.*?)</figure>", page, flags=re.S):
        m = re.search(r'alt="(.+?) iteration (\d+) gen (\d+) generated"', fig)
        assert m, fig[:200]
        key = (html.unescape(m.group(1)), int(m.group(2)), int(m.group(3)))
        out[key] = "class='memorized'" in fig
    return out


def test_memorized_highlight_marks_exactly_d1_below_d2_over_3(report):
    _, text = report
    pairs = _pairs(text)
    expected = {
        (run, i, gen): d1 < d2 / 3
        for run, finished in (("alpha", 3), ("beta<b>", 2))
        for i in range(finished)
        for gen, (d1, d2) in enumerate(NEAREST_D)
    }
    assert pairs == expected
    assert sum(expected.values()) == 3 * 5  # two clear cases and the ulp below, per iteration


@pytest.mark.parametrize("finished", range(1, ITERATIONS + 1))
def test_last_iteration_table_shows_the_last_row(tmp_path, finished):
    """After each iteration the report's table holds that iteration's metrics.json row (per run)."""
    alpha = _make_run(tmp_path / "runs", "alpha", 0, finished=finished, paradigm="replace")
    beta = _make_run(tmp_path / "runs", "beta", 1, finished=1, paradigm="replace")
    assert main(["report", str(alpha), str(beta), "--out", str(tmp_path / "out")]) == 0
    summary = report_summary((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    for run, last in ((alpha, finished - 1), (beta, 0)):
        row = json.loads(Path(layout.iter_path(str(run), last, layout.ITER_METRICS)).read_text())
        shown = summary[run.name]
        assert shown["iteration"] == str(last)
        assert shown["fid"] == "—"
        for key, value in row.items():
            if key not in ("iteration", "fid"):
                assert float(shown[key]) == pytest.approx(value, rel=5e-4), (run.name, key)


def test_collect_partial_run_and_order(tmp_path):
    run = _make_run(tmp_path, "r", 3, finished=1, paradigm="fresh")
    (run / layout.METRICS_JSON).unlink()
    data = collect_run(str(run), "r", max_pairs=2)
    assert data.rows == []
    assert [it.iteration for it in data.iterations] == [0, 1, 2]
    # smallest d1 first, capped
    assert [p.d1 for p in data.iterations[0].nearest] == [0.1, NEAREST_D[4][0]]
    assert any("metrics.json missing" in n for n in data.notes)
    assert unique_names(["a/run", "b/run", "c/x"]) == ["a/run", "b/run", "x"]
    assert unique_names(["a/run", "a/run/"]) == ["a/run", "a/run#2"]


def test_bad_inputs(tmp_path, capsys):
    code = main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a run folder" in capsys.readouterr().err
    run = _make_run(tmp_path, "r", 0, finished=1, paradigm="replace")
    (tmp_path / "file").write_text("x")
    code = main(["report", str(run), "--out", str(tmp_path / "file" / "sub")])
    assert code == 2 and "writable" in capsys.readouterr().err


def test_import_has_no_side_effects():
    code = (
        "import sys, raycollapse.report, raycollapse.report.plots, raycollapse.report.html;"
        "assert 'ray' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _chromium() -> str:
    if os.environ.get("RAYCOLLAPSE_SKIP_BROWSER") == "1":
        pytest.skip("RAYCOLLAPSE_SKIP_BROWSER=1: headless Chromium check skipped")
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium not found on PATH: install it (`apt-get install -y chromium`) or set "
            "RAYCOLLAPSE_SKIP_BROWSER=1 to skip the browser check"
        )
    return path


def _browser(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


# Injected by the test into a copy of the page: on load, count the images that decoded.
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var ok = 0, failed = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (img.complete && img.naturalWidth > 0) { ok++; } else { failed.push(img.alt || String(i)); }
  }
  var el = document.createElement("div");
  el.id = "test-image-check";
  el.setAttribute("data-loaded", String(ok));
  el.setAttribute("data-failed", failed.join("; "));
  document.body.appendChild(el);
});
</script>"""


def _loaded_images(chromium: str, page: str, tmp_path: Path) -> tuple[int, str]:
    """(images decoded, alts of those that failed) in headless Chromium, via the DOM it dumps."""
    copy = tmp_path / f"checked-{len(list(tmp_path.iterdir()))}.html"
    copy.write_text(page.replace("</body>", _IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = _browser(chromium, tmp_path, "--dump-dom", copy.resolve().as_uri())
    m = re.search(r'<div id="test-image-check"[^>]*>', dom.stdout)
    assert m, f"the injected check did not run; stderr: {dom.stderr[-2000:]}"
    attrs = dict(re.findall(r'(data-[\w-]+)="([^"]*)"', m.group(0)))
    return int(attrs["data-loaded"]), html.unescape(attrs["data-failed"])


def test_chromium_loads_every_image(report, tmp_path):
    chromium = _chromium()
    index, text = report
    loaded, failed = _loaded_images(chromium, text, tmp_path)
    assert failed == "" and loaded == text.count("<img ")
    # the check itself sees a broken image: bytes that are no PNG
    src = re.search(r'src="(data:image/png;base64,[^"]+)"', text).group(1)
    broken = text.replace(
        src, "data:image/png;base64," + base64.b64encode(b"not a png").decode(), 1
    )
    loaded, failed = _loaded_images(chromium, broken, tmp_path)
    assert loaded == text.count("<img ") - 1 and failed

    url = index.resolve().as_uri()
    shot = tmp_path / "report.png"
    res = _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert shot.is_file(), res.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        lo, hi = zip(*im.convert("RGB").getextrema(), strict=True)
        assert max(hi) - min(lo) > 100  # not a blank page
    keep = os.environ.get("RAYCOLLAPSE_REPORT_SCREENSHOT")
    if keep:  # lets a person look at what the browser rendered
        shutil.copy(shot, keep)


# ---------------------------------------------------------------------------------------------
# The entropy-generalization correlation and summary.json


def _tables(page: str) -> dict[str, list[list[str]]]:
    from helpers import _Tables

    parser = _Tables()
    parser.feed(page)
    return parser.tables


def test_correlation_and_summary_json(report):
    import statistics

    index, text = report
    summary = json.loads((index.parent / "summary.json").read_text())
    assert "NaN" not in (index.parent / "summary.json").read_text()
    # The rows written by _make_run: alpha (seed 0) 3 iterations, beta (seed 1) 2.
    data = {
        "alpha": [(5.0 - i * 0.5, 1.0 / (i + 1)) for i in range(3)],
        "beta<b>": [(5.0 - i * 0.5 + 0.1, 1.0 / (i + 1)) for i in range(2)],
    }
    pooled = [p for pts in data.values() for p in pts]
    r_all = statistics.correlation([x for x, _ in pooled], [y for _, y in pooled])
    assert summary["x"] == "entropy_train" and summary["y"] == "generalization_score"
    assert summary["correlation"]["n"] == 5
    assert summary["correlation"]["r"] == pytest.approx(r_all, rel=1e-12)
    shown = {row[0]: row[1:] for row in _tables(text)["correlation-section"][1:]}
    assert shown["all runs"] == [f"{r_all:.4g}", "5"]
    for run, name in zip(summary["runs"], data, strict=True):
        xs, ys = zip(*data[name], strict=True)
        r = statistics.correlation(xs, ys)
        assert run["name"] == name and run["correlation"]["n"] == len(xs)
        assert run["correlation"]["r"] == pytest.approx(r, rel=1e-12)
        assert shown[name] == [f"{r:.4g}", str(len(xs))]
        assert run["iterations_finished"] == len(xs) and run["iterations_planned"] == ITERATIONS
        assert run["last"]["iteration"] == len(xs) - 1 and run["last"]["fid"] is None
    assert "alt='scatter: entropy_train vs generalization_score'" in text


def test_correlation_undefined_is_said(tmp_path):
    one = _make_run(tmp_path / "runs", "one", 0, finished=1, paradigm="replace")
    assert main(["report", str(one), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runs"][0]["correlation"] == {
        "r": None, "n": 1, "undefined": "fewer than 2 points"
    }  # fmt: skip
    page = (tmp_path / "out" / "index.html").read_text()
    row = _tables(page)["correlation-section"][1]
    assert row == ["one", "undefined: fewer than 2 points", "1"]


# ---------------------------------------------------------------------------------------------
# The sweep report


def _make_sweep(root: Path) -> tuple[Path, list[dict]]:
    """A finished sweep's folder as `raycollapse sweep` leaves it: sweep.yaml, results.parquet."""
    sweep = root / "sweep"
    sweep.mkdir(parents=True)
    cfg = {
        "sweep": {
            "kind": "loop",
            "space": {"select.method": {"grid": ["greedy", "random"]}},
            "variants": [{"loop.pool_multiple": 1.0}, {"loop.pool_multiple": 5.0}],
            "objective": {"metric": "generalization_score", "mode": "max", "reduce": "last"},
        },
        "base": {},
    }
    (sweep / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for j, (method, m) in enumerate(
        [("greedy", 1.0), ("greedy", 5.0), ("random", 1.0), ("random", 5.0)]
    ):
        iterations = 1 if j == 3 else 3  # the last trial stopped early
        for i in range(iterations):
            score = 0.2 + 0.05 * j - 0.03 * i
            rows.append({
                "trial_id": f"t{j}", "status": "stopped_early" if j == 3 else "finished",
                "iteration": i, "select.method": method, "loop.pool_multiple": m,
                "entropy_train": 3.0 + j * 0.2 - i * 0.4 + (0.05 if i == 1 else 0.0),
                "generalization_score": score, "fid": None, "objective": score,
            })  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), sweep / "results.parquet")
    return sweep, rows


def test_sweep_report(tmp_path):
    import statistics

    sweep, rows = _make_sweep(tmp_path)
    assert main(["report", str(sweep)]) == 0
    out = sweep / "report"
    page = (out / "index.html").read_text(encoding="utf-8")
    tables = _tables(page)
    trials = tables["trials-section"]
    assert trials[0] == ["trial", "status", "select.method", "loop.pool_multiple", "iterations",
                         "final objective"]  # fmt: skip
    # best: the highest final objective among finished trials (t3 is higher but stopped early)
    finals = {f"t{j}": 0.2 + 0.05 * j - 0.03 * 2 for j in range(3)}
    assert [r[0] for r in trials[1:]] == ["t0", "t1", "t2 (best)", "t3"]
    assert trials[3][1:] == ["finished", "random", "1", "3", f"{finals['t2']:.4g}"]
    r = statistics.correlation([x["entropy_train"] for x in rows],
                               [x["generalization_score"] for x in rows])  # fmt: skip
    corr = {row[0]: row[1:] for row in tables["correlation-section"][1:]}
    assert corr["all trials"] == [f"{r:.4g}", str(len(rows))]
    assert corr["t3"] == ["undefined: fewer than 2 points", "1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correlation"]["r"] == pytest.approx(r, rel=1e-12)
    assert summary["best_trial"] == "t2" and summary["trials"][3]["status"] == "stopped_early"
    parser = _Imgs()
    parser.feed(page)
    alts = {img["alt"] for img in parser.imgs}
    assert alts == {"plot: objective", "plot: objective vs select.method",
                    "plot: objective vs loop.pool_multiple",
                    "scatter: entropy_train vs generalization_score"}  # fmt: skip
    # a sweep is reported alone; runs still need --out
    assert main(["report", str(sweep), str(sweep)]) == 2
    run = _make_run(tmp_path, "r", 0, finished=1, paradigm="replace")
    assert main(["report", str(run)]) == 2
    chromium = _chromium()
    loaded, failed = _loaded_images(chromium, page, tmp_path)
    assert failed == "" and loaded == 4
