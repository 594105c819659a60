"""The loop's training sets, sample grid and nearest pairs read only the rows they need.

A run folder is laid out by hand as the loop lays it out (real data and pools as image shards
with ids shuffled inside and across files, some labels null; embedding shards {id, embedding}),
and the loop's own stages build the training sets in chunks of a few rows. The reference is the
straightforward computation the loop did before: decode every image of every origin, index by
id, encode each picked image as PNG with PIL, and build the whole table at once.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import brute_distances, plain_greedy, plain_random
from PIL import Image

from raycollapse.config import load_config
from raycollapse.curation.refs import Refs
from raycollapse.io.grids import image_grid
from raycollapse.loop.catalog import Catalog, read_train_refs
from raycollapse.loop.measure import GRID_SAMPLES, NEAREST_PAIRS, write_nearest, write_samples_png
from raycollapse.loop.rundir import RunDir
from raycollapse.loop.runner import Loop
from raycollapse.seeds import derive_rng, derive_seed

B, POOL, REAL, SIDE, D, CHUNK = 12, 40, 60, 6, 3, 5
SUBSET, SELECT = 1, 2  # loop/runner.py: seed purposes of iteration 0's subset and the selection


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder: Path, ids: np.ndarray, files: int, seed: int, **columns) -> None:
    """Rows ``{id, **columns}`` shuffled and cut into ``files`` Parquet files."""
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    for j, part in enumerate(np.array_split(order, files)):
        data = {"id": pa.array(ids[part], pa.int64())}
        for name, (values, typ) in columns.items():
            data[name] = pa.array([values[i] for i in part], typ)
        pq.write_table(pa.table(data), folder / f"part-{j:05d}.parquet")


def _write_origin(root: Path, folder: str, ids: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(ids), SIDE, SIDE, 3), dtype=np.uint8)
    labels = [None if v < 0 else int(v) for v in rng.integers(-2, 10, len(ids))]
    _write_shards(
        root / folder / ("data" if folder == "real" else "pool"), ids, 3, seed,
        image=([_png(im) for im in images], pa.binary()), label=(labels, pa.int64()),
    )  # fmt: skip
    emb = rng.normal(size=(len(ids), D)).astype(np.float32)
    _write_shards(
        root / folder / "embeddings" / "pixel", ids, 2, seed + 1,
        embedding=(list(emb), pa.list_(pa.float32())),
    )  # fmt: skip


def _cfg(run: Path, paradigm: str, method: str = "none", *extra: str):
    return load_config(None, [
        f"loop.storage={run}", f"loop.paradigm={paradigm}", f"loop.train_size={B}",
        "loop.metric_features=[pixel]", "features.name=pixel", f"select.method={method}",
        "knn.shards=1", *extra,
    ])  # fmt: skip


def _loop(run: Path, cfg) -> Loop:
    return Loop(cfg, RunDir(str(run)), Catalog(str(run), 3, chunk_rows=CHUNK), ["pixel"])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Real data, pools 0 and 1, and the training sets of iterations 0 and 1 written by the loop."""
    root = tmp_path_factory.mktemp("run")
    _write_origin(root, "real", np.arange(REAL) * 3 + 1, 1)  # ids are not row numbers
    _write_origin(root, "iter_000", np.arange(POOL), 2)
    _write_origin(root, "iter_001", np.arange(POOL) + 1000, 3)
    loop = _loop(root, _cfg(root, "replace"))
    loop.stage_train_set(0)
    loop.stage_train_set(1)
    return root


def _decode_all(run: Path, origin: str) -> dict[int, tuple[np.ndarray, int]]:
    """Every image of an origin, decoded, by id (the old path), with its label (-1 for none)."""
    folder = run / "real/data" if origin == "real" else run / f"iter_{int(origin[4:]):03d}/pool"
    table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    out = {}
    for i, b, lab in zip(
        *(table.column(c).to_pylist() for c in ("id", "image", "label")), strict=True
    ):
        out[i] = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), -1 if lab is None else lab)
    return out


def _expected_table(run: Path, refs: list[tuple[str, int]]) -> pa.Table:
    """The training set table as the loop built it before: all at once from decoded origins."""
    cache = {o: _decode_all(run, o) for o in {o for o, _ in refs}}
    labels = np.array([cache[o][i][1] for o, i in refs], dtype=np.int64)
    return pa.table({
        "id": pa.array(np.arange(len(refs)), pa.int64()),
        "image": pa.array([_png(cache[o][i][0]) for o, i in refs], pa.binary()),
        "label": pa.array(labels, pa.int64(), mask=labels < 0),
        "source": pa.array([o for o, _ in refs], pa.string()),
        "origin": pa.array([o for o, _ in refs], pa.string()),
        "origin_id": pa.array([i for _, i in refs], pa.int64()),
    })  # fmt: skip


def _per_generation(origins: list[str], n: int, seed: int) -> list[int]:
    """The paper's "accumulated" baseline written out: n // G + 1 of a seeded permutation of
    each origin (oldest first), concatenated, cut to n."""
    names = list(dict.fromkeys(origins))
    rng = derive_rng(seed, 0xACC)
    out: list[int] = []
    for name in names:
        rows = [i for i, o in enumerate(origins) if o == name]
        perm = rng.permutation(len(rows))
        out += [rows[p] for p in perm[: n // len(names) + 1]]
    return out[:n]


def _vectors(run: Path, refs: list[tuple[str, int]]) -> np.ndarray:
    by = {}
    for o in {o for o, _ in refs}:
        folder = (run / "real" if o == "real" else run / f"iter_{int(o[4:]):03d}") / "embeddings"
        t = pa.concat_tables(pq.read_table(f) for f in sorted((folder / "pixel").glob("*.parquet")))
        by[o] = dict(
            zip(t.column("id").to_pylist(), t.column("embedding").to_pylist(), strict=True)
        )
    return np.asarray([by[o][i] for o, i in refs], dtype=np.float32)


def _expected_refs(run: Path, cfg, t: int) -> list[tuple[str, int]]:
    """Iteration t's references by the definitions (docs/design.md, "Paradigms")."""
    pools = [[(f"gen_{k}", int(i)) for i in np.arange(POOL) + 1000 * k] for k in range(t)]
    trains = [read_train_refs(str(run / f"iter_{k:03d}/train_set")).tolist() for k in range(t)]
    paradigm, keep, n_fresh = cfg.loop.paradigm, [], 0
    cands = pools[-1]
    if paradigm == "accumulate":
        cands = trains[0] + [r for p in pools for r in p]
    elif paradigm == "accumulate_all":
        keep = trains[-1]
    elif paradigm == "fresh":
        n_fresh = round(float(cfg.loop.fresh_fraction) * B)
    seed = derive_seed(int(cfg.seed) + int(cfg.select.seed), t, SELECT)
    if cfg.loop.accumulate_baseline == "per_generation":
        idx = _per_generation([o for o, _ in cands], B, seed)
    elif cfg.select.method == "greedy":
        idx = plain_greedy(_vectors(run, cands), B - n_fresh, seed)
    else:
        idx = plain_random(len(cands), B - n_fresh, seed)
    refs = keep + [cands[int(i)] for i in idx]
    if n_fresh:
        used = {i for tr in trains for o, i in tr if o == "real"}
        available = np.array(sorted(set((np.arange(REAL) * 3 + 1).tolist()) - used))
        rng = derive_rng(int(cfg.seed), t, 0xF5E5)
        refs += [("real", int(i)) for i in np.sort(rng.choice(available, n_fresh, replace=False))]
    return refs


def _check_stage(run: Path, loop: Loop, t: int, refs: list[tuple[str, int]]) -> None:
    got = pq.read_table(run / f"iter_{t:03d}/train_set/part-00000.parquet")
    want = _expected_table(run, refs)
    assert got.schema.equals(want.schema)
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), name
    # only the rows of the training set were decoded, and no origin was loaded whole
    assert loop.cat.rows_decoded == len(refs) and not loop.cat._images


def test_first_training_sets_are_the_old_tables(run):
    cfg = _cfg(run, "replace")
    ids = np.arange(REAL) * 3 + 1
    rng = np.random.default_rng(derive_seed(int(cfg.seed), 0, SUBSET))
    refs0 = [("real", int(i)) for i in np.sort(rng.choice(ids, size=B, replace=False))]
    assert read_train_refs(str(run / "iter_000/train_set")) == refs0
    got = pq.read_table(run / "iter_000/train_set/part-00000.parquet")
    assert got.equals(_expected_table(run, refs0))
    assert pq.ParquetFile(run / "iter_000/train_set/part-00000.parquet").num_row_groups == 3
    refs1 = _expected_refs(run, cfg, 1)
    assert pq.read_table(run / "iter_001/train_set/part-00000.parquet").equals(
        _expected_table(run, refs1)
    )


@pytest.mark.parametrize(
    "paradigm, method, extra",
    [
        ("replace", "greedy", ()),
        ("accumulate", "none", ()),
        ("accumulate", "none", ("loop.accumulate_baseline=per_generation",)),
        ("accumulate_all", "random", ()),
        ("fresh", "none", ("loop.fresh_fraction=0.25",)),
    ],
)
def test_streamed_training_set_equals_the_old_table(tmp_path, run, paradigm, method, extra):
    cfg = _cfg(run, paradigm, method, *extra)
    loop = _loop(run, cfg)
    refs = _expected_refs(run, cfg, 2)
    assert loop.next_train_set(2) == refs
    loop.cat.rows_decoded = 0
    loop.stage_train_set(2)
    _check_stage(run, loop, 2, refs)


def test_one_chunk_writes_the_old_file_byte_for_byte(tmp_path, run):
    """A set of at most one chunk is one row group: the file pq.write_table wrote before."""
    cat = Catalog(str(run), 3, chunk_rows=B)
    refs = read_train_refs(str(run / "iter_001/train_set"))
    cat.write_train_set(refs, str(tmp_path / "part-00000.parquet"))
    buf = io.BytesIO()
    pq.write_table(_expected_table(run, refs.tolist()), buf)
    assert (tmp_path / "part-00000.parquet").read_bytes() == buf.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]  # no temporary left


def test_grid_and_nearest_read_only_their_rows(tmp_path, run):
    cat = Catalog(str(run), 3)
    refs = read_train_refs(str(run / "iter_001/train_set")).tolist()
    write_samples_png(cat, 1, str(tmp_path / "samples.png"))
    assert cat.rows_decoded == min(GRID_SAMPLES, POOL)
    pool = _decode_all(run, "gen_1")
    grid = Image.fromarray(image_grid(np.stack([pool[i][0] for i in sorted(pool)][:GRID_SAMPLES])))
    scale = max(1, -(-192 // max(grid.size)))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    assert (tmp_path / "samples.png").read_bytes() == buf.getvalue()

    write_nearest(cat, 1, refs, "pixel", str(tmp_path / "nearest.parquet"))
    gen_ids = sorted(pool)[:B]
    dist = brute_distances(_vectors(run, refs), _vectors(run, [("gen_1", i) for i in gen_ids]))
    nn = np.argsort(dist.T, axis=1, kind="stable")[:, :2]  # per generated row: 2 nearest train
    d = np.take_along_axis(dist.T, nn, axis=1)
    order = np.lexsort((d[:, 0], d[:, 0] / np.maximum(d[:, 1], 1e-12)))[:NEAREST_PAIRS]
    train = _decode_all(run, "gen_0")
    got = pq.read_table(tmp_path / "nearest.parquet")
    assert got.column("gen_id").to_pylist() == [gen_ids[j] for j in order]
    assert got.column("train_id").to_pylist() == nn[order, 0].tolist()
    np.testing.assert_allclose(got.column("d1").to_numpy(), d[order, 0], rtol=1e-5)
    assert got.column("gen_image").to_pylist() == [_png(pool[gen_ids[j]][0]) for j in order]
    want_train = [_png(train[refs[int(j)][1]][0]) for j in nn[order, 0]]
    assert got.column("train_image").to_pylist() == want_train
    assert cat.rows_decoded == min(GRID_SAMPLES, POOL) + 2 * len(order) and not cat._images
    assert not cat._emb  # the pool's (and the training set's) embeddings were not loaded whole


def test_lazy_images_are_the_arrays_paper_metrics_indexes(run):
    """paper_metrics takes ``len``, a leading slice of the pool and an integer array of the
    training set: the loop's lazy rows give those arrays, reading only those rows."""
    from raycollapse.loop.measure import LazyImages

    cat = Catalog(str(run), 3)
    refs = read_train_refs(str(run / "iter_001/train_set"))
    pool, gen0 = _decode_all(run, "gen_1"), _decode_all(run, "gen_0")
    generated = LazyImages(cat, Refs.of_origin("gen_1", cat.image_ids("gen_1")))
    train = LazyImages(cat, refs)
    assert len(generated) == POOL and len(train) == B
    np.testing.assert_array_equal(generated[:5], np.stack([pool[i][0] for i in sorted(pool)[:5]]))
    pick = np.array([7, 0, 3])
    np.testing.assert_array_equal(train[pick], np.stack([gen0[refs[int(j)][1]][0] for j in pick]))
    assert cat.rows_decoded == 5 + 3 and not cat._images
