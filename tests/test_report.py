"""`raycollapse report`: two fake runs (one unfinished) -> index.html, checked as HTML and in Chromium."""

from __future__ import annotations

import base64
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
from PIL import Image

from raycollapse.cli.main import main
from raycollapse.loop import layout
from raycollapse.report.collect import collect_run, unique_names

ITERATIONS = 3


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
        rows.append(
            {
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
        )
    (run / layout.METRICS_JSON).write_text(json.dumps(rows))
    for i in range(ITERATIONS):
        Path(layout.iter_dir(str(run), i)).mkdir()
        if i >= finished:
            continue  # the unfinished iteration: folder exists, files do not
        grid = rng.integers(0, 256, (4 * 10, 4 * 10), dtype=np.uint8)
        Image.fromarray(grid, mode="L").save(layout.iter_path(str(run), i, layout.SAMPLES_PNG))
        n = 3
        table = pa.table(
            {
                "gen_id": pa.array(range(n), pa.int64()),
                "train_id": pa.array(range(100, 100 + n), pa.int64()),
                "d1": pa.array([0.3, 0.1, 2.0]),  # unsorted on purpose
                "d2": pa.array([1.5, 1.0, 2.5]),
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
    # sample grids: alpha 3 iterations + beta 2; memorized pairs: 3 per finished iteration, 2 images each
    assert sum("samples iteration" in (a or "") for a in alts) == 5
    assert sum(" generated" in (img["alt"] or "") for img in parser.imgs) == 5 * 3


def test_collect_partial_run_and_order(tmp_path):
    run = _make_run(tmp_path, "r", 3, finished=1, paradigm="fresh")
    (run / layout.METRICS_JSON).unlink()
    data = collect_run(str(run), "r", max_pairs=2)
    assert data.rows == []
    assert [it.iteration for it in data.iterations] == [0, 1, 2]
    assert [p.d1 for p in data.iterations[0].nearest] == [0.1, 0.3]  # smallest d1 first, capped
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


def test_chromium_loads_every_image(report, tmp_path):
    chromium = _chromium()
    index, text = report
    url = index.resolve().as_uri()
    dom = _browser(chromium, tmp_path, "--dump-dom", url)
    m = re.search(r'<div id="image-check"[^>]*>', dom.stdout)
    assert m, f"no #image-check in dumped DOM; stderr: {dom.stderr[-2000:]}"
    attrs = dict(re.findall(r'(data-[\w-]+)="([^"]*)"', m.group(0)))
    assert attrs.get("data-status") == "done", attrs
    assert attrs["data-failed"] == "0", attrs
    assert int(attrs["data-loaded"]) == text.count("<img ")

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
