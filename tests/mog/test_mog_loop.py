"""The loop on a mixture of Gaussians, measured as the image quickstart is: without selection the
training set's entropy falls; greedy selection from a pool twice as large keeps it higher.

Both runs share iteration 0 (same seed: same real subset, same model, and the m = 1 pool is the
first half of the m = 2 pool), so the comparison isolates the selection; they stop once the
training set of iteration 1 is written (``until="1:train_set"``), which is what is compared. A
small set (B = 64) fitted long (1500 epochs) is the memorization regime. Entropies are recomputed
here from the stored vectors with the plain KL definition (tests/helpers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import kl_entropy_direct

from raycollapse.config import load_config
from raycollapse.data.mog import mixture_entropy, mixture_from_config
from raycollapse.loop.runner import run_loop
from raycollapse.report.collect import collect_runs
from raycollapse.report.scatter import mog_section, reference_rows
from raycollapse.seeds import derive_seed

pytestmark = pytest.mark.slow

TINY = [
    "data.source=mog",
    "data.n=400",
    "data.mog.components=3",
    "data.mog.dim=2",
    "data.mog.scale=0.15",
    "data.mog.mc_samples=20000",
    "model.preset=mlp",
    "train.steps=1500",
    "train.batch_size=64",
    "train.lr=0.003",
    "train.warmup_steps=20",
    "train.ema_decay=0.99",
    "train.checkpoint_every=0",
    "train.log_every=400",
    "train.cpu_threads=1",
    "sample.steps=20",
    "sample.eta=0.5",
    "sample.group_size=32",
    "sample.batch_size=64",
    "knn.k=2",
    "loop.iterations=2",
    "loop.train_size=64",
    "resources.generate_actors=0",  # as configs/mog_*.yaml: no actor start-up per iteration
    "resources.embed_actors=0",
]


def _vectors(folder: Path) -> np.ndarray:
    table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    table = table.sort_by("id")
    assert "image" not in table.column_names
    return np.asarray(table.column("vector").to_pylist(), dtype=np.float32)


def test_collapse_without_selection_and_greedy_keeps_entropy(ray_local, tmp_path):
    runs = {
        "none": ["select.method=none", "loop.pool_multiple=1"],
        "greedy": ["select.method=greedy", "loop.pool_multiple=2"],
    }
    rows, train_h = {}, {}
    for name, extra in runs.items():
        cfg = load_config(None, [*TINY, *extra, f"loop.storage={tmp_path / name}"])
        run_loop(cfg, until="1:train_set", log=lambda m: None)
        rows[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        train_h[name] = [
            kl_entropy_direct(_vectors(tmp_path / name / f"iter_{t:03d}" / "train_set"), 2)
            for t in range(2)
        ]
        assert rows[name][0]["entropy_train"] == pytest.approx(train_h[name][0], abs=1e-4)
        assert (tmp_path / name / "iter_000" / "samples.png").stat().st_size > 0
    truth = mixture_entropy(
        mixture_from_config(cfg.data.mog), mc_samples=20000, seed=derive_seed(cfg.data.seed, 1)
    ).value
    assert rows["none"][0]["entropy_true"] == rows["greedy"][0]["entropy_true"] == truth
    # The pool of m = 1 is the first half of the pool of m = 2 (sample i depends on (seed, i)).
    pool_none = _vectors(tmp_path / "none" / "iter_000" / "pool")
    assert np.array_equal(pool_none, _vectors(tmp_path / "greedy" / "iter_000" / "pool")[:64])
    none, greedy = train_h["none"], train_h["greedy"]
    assert none[0] == greedy[0]
    assert none[1] < none[0]  # collapse: the self-consuming loop loses entropy
    assert greedy[1] > none[1]  # greedy selection keeps more of it

    # The report section: the trajectories against the memorization limit, which starts from the
    # same training set (its first entropy_train is the run's).
    data = collect_runs([str(tmp_path / n) for n in runs])
    html = mog_section(data)
    assert "Mixture of Gaussians" in html and html.count("<img") == 1
    ref = reference_rows(str(tmp_path / "none"), data[0].config, 1)
    assert ref[0]["entropy_train"] == pytest.approx(none[0], abs=1e-4)
    assert ref[0]["generalization_score"] < 1e-2  # the fully fitted model copies
