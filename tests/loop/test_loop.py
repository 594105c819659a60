"""The recursive loop end to end on a tiny config, checked against references computed here.

Every check reads the run folder (Parquet shards, metrics.json, model weights) and recomputes
what the loop should have done with the plain definitions of ``tests/helpers.py``: the training
set of iteration t+1 is the selection applied to the stored embeddings with the derived seed;
the metrics are brute-force KL entropy / nearest distances; FID is the Fréchet distance of
Inception features extracted here; a fine-tuned model starts from the previous weights.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    brute_distances,
    frechet_reference,
    kl_entropy_direct,
    nearest_two,
    plain_greedy,
    plain_random,
    plain_threshold,
    report_summary,
    session_ray_address,
    start_local_ray,
)
from PIL import Image

from raycollapse.cli.main import main
from raycollapse.config import load_config
from raycollapse.errors import UserInputError
from raycollapse.loop.runner import STAGES, run_loop
from raycollapse.metrics.distribution import prdc
from raycollapse.seeds import derive_seed

pytestmark = pytest.mark.slow

TINY = [
    "data.n=200",
    "train.steps=16",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "train.log_every=8",
    "train.checkpoint_every=0",
    "train.cpu_threads=1",
    "sample.steps=3",
    "sample.group_size=16",
    "sample.batch_size=32",
    "knn.k=2",
    "loop.iterations=2",
    "loop.train_size=16",
    "loop.pool_multiple=2",
    "loop.metric_features=[pixel]",
]
TIMING = ("seconds_", "images_per_second")
SELECT_PURPOSE = 2  # loop/runner.py derives the selection seed as (seed + select.seed, t, 2)
SUBSET_PURPOSE = 1  # and iteration 0's real subset as (seed, 0, 1)

Ref = tuple[str, int]


def tiny_cfg(storage: Path, *extra: str):
    return load_config(None, [*TINY, f"loop.storage={storage}", *extra])


# -- reading a run folder ------------------------------------------------------------------


def _parquet(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    assert files, f"no Parquet shard in {folder}"
    return pa.concat_tables(pq.read_table(f) for f in files).sort_by("id")


def _iter(run: Path, t: int) -> Path:
    return run / f"iter_{t:03d}"


def _origin_dir(run: Path, origin: str) -> Path:
    return run / "real" if origin == "real" else _iter(run, int(origin.split("_")[1]))


def _embeddings(run: Path, origin: str, features: str) -> dict[int, np.ndarray]:
    table = _parquet(_origin_dir(run, origin) / "embeddings" / features)
    vectors = table.column("embedding").to_pylist()
    return {
        i: np.asarray(v, dtype=np.float32)
        for i, v in zip(table.column("id").to_pylist(), vectors, strict=True)
    }


def _images(run: Path, origin: str) -> dict[int, np.ndarray]:
    folder = _origin_dir(run, origin) / ("data" if origin == "real" else "pool")
    table = _parquet(folder)
    return {
        i: np.asarray(Image.open(io.BytesIO(b)))
        for i, b in zip(
            table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True
        )
    }


def _train_refs(run: Path, t: int) -> list[Ref]:
    table = _parquet(_iter(run, t) / "train_set")
    assert table.column("id").to_pylist() == list(range(len(table)))
    return list(
        zip(table.column("origin").to_pylist(), table.column("origin_id").to_pylist(), strict=True)
    )


def _vectors(run: Path, refs: list[Ref], features: str) -> np.ndarray:
    cache: dict[str, dict[int, np.ndarray]] = {}
    for origin, _ in refs:
        if origin not in cache:
            cache[origin] = _embeddings(run, origin, features)
    return np.stack([cache[o][i] for o, i in refs])


def _metrics(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def _results(rows: list[dict]) -> list[dict]:
    """Metric rows without timings (those differ between any two runs)."""
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


# -- references ----------------------------------------------------------------------------


def expected_train_set(run: Path, cfg, t: int) -> tuple[list[Ref], int]:
    """Iteration t's training set by the paradigm and selection definitions, without the fresh
    real images (checked separately); returns it and the number of fresh images expected."""
    loop, sel = cfg.loop, cfg.select
    b = int(loop.train_size)
    pools = [
        [(f"gen_{k}", i) for i in sorted(_embeddings(run, f"gen_{k}", "pixel"))] for k in range(t)
    ]
    keep: list[Ref] = []
    n_fresh = 0
    if loop.paradigm == "replace":
        cands = pools[-1]
    elif loop.paradigm == "accumulate":
        cands = _train_refs(run, 0) + [r for pool in pools for r in pool]
    elif loop.paradigm == "accumulate_all":
        keep, cands = _train_refs(run, t - 1), pools[-1]
    else:  # fresh: round(lambda B) fresh real images, the rest selected from the last pool
        n_fresh = int(round(float(loop.fresh_fraction) * b))
        cands = pools[-1]
    n = b - n_fresh
    seed = derive_seed(int(cfg.seed) + int(sel.seed), t, SELECT_PURPOSE)
    if sel.method in ("none", "random") or n == len(cands):
        idx = plain_random(len(cands), n, seed)
    else:
        x = _vectors(run, cands, str(cfg.features.name))
        if sel.method == "greedy":
            idx = plain_greedy(x, n, seed)
        else:
            idx = plain_threshold(x, n, float(sel.tau0), float(sel.decay), seed)
    return keep + [cands[int(i)] for i in idx], n_fresh


def check_train_sets(run: Path, cfg) -> None:
    """Every training set equals the definitions; its images are the referenced images."""
    b = int(cfg.loop.train_size)
    real_ids = sorted(_images(run, "real"))
    rng = np.random.default_rng(derive_seed(int(cfg.seed), 0, SUBSET_PURPOSE))
    subset = np.sort(rng.choice(np.asarray(real_ids), size=b, replace=False))
    assert _train_refs(run, 0) == [("real", int(i)) for i in subset]
    used_real = {i for _, i in _train_refs(run, 0)}
    for t in range(1, int(cfg.loop.iterations)):
        refs = _train_refs(run, t)
        expected, n_fresh = expected_train_set(run, cfg, t)
        assert refs[: len(expected)] == expected, (
            f"iteration {t}: training set != {cfg.select.method}"
        )
        fresh = refs[len(expected) :]
        assert len(fresh) == n_fresh
        assert all(o == "real" for o, _ in fresh)
        assert len({i for _, i in fresh}) == n_fresh and not {i for _, i in fresh} & used_real
        used_real |= {i for o, i in refs if o == "real"}
    for t in range(int(cfg.loop.iterations)):
        table = _parquet(_iter(run, t) / "train_set")
        stored = [np.asarray(Image.open(io.BytesIO(b))) for b in table.column("image").to_pylist()]
        sources: dict[str, dict[int, np.ndarray]] = {}
        for (origin, i), img in zip(_train_refs(run, t), stored, strict=True):
            if origin not in sources:
                sources[origin] = _images(run, origin)
            np.testing.assert_array_equal(img, sources[origin][i])


def check_metrics(run: Path, cfg) -> None:
    """Each metrics row equals the definitions recomputed by brute force from the run folder."""
    k, eps = int(cfg.knn.k), float(cfg.knn.eps)
    rows = _metrics(run)
    assert [r["iteration"] for r in rows] == list(range(int(cfg.loop.iterations)))
    for row in rows:
        t = row["iteration"]
        assert json.loads((_iter(run, t) / "metrics.json").read_text()) == row
        refs = _train_refs(run, t)
        pool = _embeddings(run, f"gen_{t}", "pixel")
        pool_x = np.stack([pool[i] for i in sorted(pool)])
        gen_x = pool_x[: len(refs)]  # the first len(train) generated samples, by id
        train_x = _vectors(run, refs, "pixel")
        d1, d2 = nearest_two(train_x, gen_x)
        expected = {
            "train_size": len(refs),
            "entropy_train": kl_entropy_direct(train_x, k, eps),
            "entropy_pool": kl_entropy_direct(pool_x, k, eps),
            "entropy_generated": kl_entropy_direct(gen_x, k, eps),
            "generalization_score": float(d1.mean()),
            "memorized_fraction": float(np.mean(d1 < d2 / 3)),
        }
        real = _embeddings(run, "real", "pixel")
        real_x = np.stack([real[i] for i in sorted(real)])
        expected["fd_pixel"] = frechet_reference(pool_x, real_x)
        # PRDC, streamed over the pool by the loop: bit for bit the whole-array function's
        want = prdc(real_x, pool_x, k=5)
        assert {key: row[key] for key in want} == want, t
        for key, value in expected.items():
            tol = 1e-6 if key == "fd_pixel" else 1e-9  # sqrtm of a singular product vs eigh
            assert row[key] == pytest.approx(value, rel=tol, abs=1e-12), (t, key)
        origins = [o for o, _ in refs]
        for origin in ["real", *(f"gen_{j}" for j in range(t))]:
            assert row[f"share_{origin}"] == origins.count(origin) / len(origins), (t, origin)
        check_nearest(run, t, train_x, pool, refs)


def check_nearest(run: Path, t: int, train_x: np.ndarray, pool: dict, refs: list[Ref]) -> None:
    """nearest.parquet: the generated samples with the smallest d1/d2, with exact d1, d2."""
    table = pq.read_table(_iter(run, t) / "nearest.parquet").to_pydict()
    gen_ids = sorted(pool)[: len(refs)]
    gen_x = np.stack([pool[i] for i in gen_ids])
    dist = brute_distances(gen_x, train_x)
    d1, d2 = nearest_two(train_x, gen_x)
    ratio = d1 / d2
    assert len(table["gen_id"]) == min(16, len(gen_ids))
    listed = [gen_ids.index(g) for g in table["gen_id"]]
    assert max(ratio[listed]) <= min(np.delete(ratio, listed), default=np.inf)
    for row, j in enumerate(listed):
        assert table["d1"][row] == pytest.approx(d1[j], rel=1e-9)
        assert table["d2"][row] == pytest.approx(d2[j], rel=1e-9)
        assert dist[j, table["train_id"][row]] == pytest.approx(d1[j], rel=1e-9)


@pytest.mark.parametrize(
    "paradigm, method, extra",
    [
        ("replace", "none", ["loop.pool_multiple=1"]),
        ("accumulate", "threshold", ["select.tau0=4.0", "select.decay=0.8"]),
        ("accumulate_all", "random", []),
        ("fresh", "greedy", ["loop.fresh_fraction=0.25"]),
    ],
)
def test_two_iterations(ray_local, tmp_path, paradigm, method, extra):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, f"loop.paradigm={paradigm}", f"select.method={method}", *extra)
    run_loop(cfg, log=lambda m: None)
    check_train_sets(run, cfg)
    check_metrics(run, cfg)
    origins = [o for o, _ in _train_refs(run, 1)]
    if paradigm == "replace":
        assert set(origins) == {"gen_0"} and len(origins) == 16
    if paradigm == "accumulate":
        # candidates are iteration 0's real set and gen_0's pool: both must be able to appear
        assert len(origins) == 16 and set(origins) <= {"real", "gen_0"}
        real0 = {i for _, i in _train_refs(run, 0)}
        assert {i for o, i in _train_refs(run, 1) if o == "real"} <= real0
    if paradigm == "accumulate_all":
        assert origins == ["real"] * 16 + ["gen_0"] * 16
    if paradigm == "fresh":
        assert origins == ["gen_0"] * 12 + ["real"] * 4  # round(0.25 * 16) fresh real images
    for r in _metrics(run):
        for key in ("precision", "recall", "density", "coverage"):
            assert r[key] is not None and np.isfinite(r[key]), key
        assert r["fid"] is None  # no Inception file in this run
    assert (run / "metrics.parquet").exists() and (run / "config.yaml").exists()
    assert (_iter(run, 1) / "samples.png").exists()


def _random_inception_file(path: Path) -> Path:
    """The FID Inception architecture with random (seeded) weights, as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    from raycollapse.features.inception import fid_inception_v3

    torch.manual_seed(1234)
    net = fid_inception_v3()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_fid_is_the_frechet_distance_of_inception_features(ray_local, tmp_path):
    """With Inception weights from a local file the loop computes FID; it equals the Fréchet
    distance (scipy sqrtm) of the features extracted here from the pool and the real images."""
    from raycollapse.features.extractors import build_extractor

    weights = _random_inception_file(tmp_path / "inception.safetensors")
    run = tmp_path / "run"
    cfg = tiny_cfg(
        run,
        "data.n=12",
        "loop.train_size=8",
        "loop.iterations=1",
        "loop.pool_multiple=1",
        "select.method=none",
        "features.name=inception",
        f"features.pretrained={weights}",
        "loop.metric_features=[pixel,inception]",
    )
    run_loop(cfg, log=lambda m: None)
    row = _metrics(run)[0]
    extractor = build_extractor("inception", str(weights))
    pool = _images(run, "gen_0")
    real = _images(run, "real")
    gen_f = extractor(np.stack([pool[i] for i in sorted(pool)]))
    real_f = extractor(np.stack([real[i] for i in sorted(real)]))
    reference = frechet_reference(gen_f, real_f)
    assert row["fid"] is not None, "FID not computed although Inception weights were given"
    assert row["fid"] == pytest.approx(reference, rel=1e-3)
    assert row["fd_inception"] == row["fid"]


def _unet(run: Path, t: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(_iter(run, t) / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted two-iteration run (from scratch), shared by the tests below."""
    start_local_ray()
    ref = tmp_path_factory.mktemp("loop") / "ref"
    run_loop(tiny_cfg(ref), log=lambda m: None)
    return ref


def test_finetune_starts_from_the_previous_model(ray_local, tmp_path):
    """With one AdamW step per iteration every weight moves by at most the learning rate (the
    first AdamW step is lr * g / (|g| + eps); the EMA lies between the start and that point).
    A fine-tuned iteration 1 therefore stays within lr of iteration 0's weights everywhere;
    started from scratch (the same init as iteration 0) it lands up to 2 lr away wherever the
    two first gradients differ in sign."""
    lr = 0.01
    ft = tmp_path / "ft"
    cfg = tiny_cfg(
        ft, "train.init=finetune", "train.steps=1", "train.warmup_steps=1", f"train.lr={lr}"
    )
    run_loop(cfg, until="1:train", log=lambda m: None)
    w0, w1 = _unet(ft, 0), _unet(ft, 1)
    assert w0.keys() == w1.keys()
    moved = max(float(np.abs(w1[k].astype(np.float64) - w0[k]).max()) for k in w0)
    assert 0.0 < moved <= lr, f"iteration 1 moved {moved} > lr={lr} from iteration 0's weights"


def test_resume_at_every_stage_boundary_equals_uninterrupted(ray_local, reference_run, tmp_path):
    ref, cut = reference_run, tmp_path / "cut"
    for stage in STAGES:  # stop after each stage of iteration 1 (and so of 0), then resume
        run_loop(tiny_cfg(cut), until=f"1:{stage}", log=lambda m: None)
    run_loop(tiny_cfg(cut), log=lambda m: None)
    assert _results(_metrics(cut)) == _results(_metrics(ref))
    said: list[str] = []
    run_loop(tiny_cfg(cut), log=said.append)
    assert any("already finished" in s for s in said)


def test_killed_driver_resumes(ray_local, reference_run, tmp_path):
    """SIGKILL the real CLI process once a stage marker appears; the re-run finishes the same.

    The CLI joins the session's Ray (RAY_ADDRESS) rather than starting a second one beside it;
    Ray cleans up the killed driver's job."""
    ref, killed = reference_run, tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": session_ray_address()}
    cfg_file = tmp_path / "empty.yaml"
    cfg_file.write_text("{}\n")
    argv = [sys.executable, "-m", "raycollapse.cli.main", "run", str(cfg_file), *TINY,
            f"loop.storage={killed}"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "iter_000" / "_done" / "generate"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the driver never reached iteration 0 generate"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "iter_001" / "_done" / "metrics").exists()
    run_loop(load_config(cfg_file, [*TINY, f"loop.storage={killed}"]), log=lambda m: None)
    assert _results(_metrics(killed)) == _results(_metrics(ref))


def test_changed_config_is_refused_and_fork(ray_local, reference_run, tmp_path):
    run = reference_run
    before = (run / "metrics.json").read_text()
    with pytest.raises(UserInputError, match=r"knn.k: 2 \(saved\) -> 3 \(now\)"):
        run_loop(tiny_cfg(run, "knn.k=3"), log=lambda m: None)
    assert (run / "metrics.json").read_text() == before
    forked = run_loop(tiny_cfg(run, "knn.k=3"), fork=True, until="0:train_set", log=lambda m: None)
    assert forked != str(run) and Path(forked, "config.yaml").exists()
    assert "k: 3" in Path(forked, "config.yaml").read_text()


def test_report_of_a_run_shows_its_last_row(reference_run, tmp_path):
    """The report's last-iteration table holds the run's last metrics row."""
    code = main(["report", str(reference_run), "--out", str(tmp_path / "report")])
    assert code == 0
    summary = report_summary((tmp_path / "report" / "index.html").read_text(encoding="utf-8"))
    last = _metrics(reference_run)[-1]
    shown = summary[reference_run.name]
    assert shown["iteration"] == str(last["iteration"])
    checked = 0
    for key, value in last.items():
        if isinstance(value, float) and key in shown:
            assert float(shown[key]) == pytest.approx(value, rel=5e-4, abs=1e-12), key
            checked += 1
    assert checked >= 10
