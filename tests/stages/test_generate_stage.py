"""The generation stage: process_batch without Ray, generate_pool on Ray Data (local and 3 nodes)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from helpers import tiny_checkpoint
from PIL import Image
from shard_hooks import kill_mid_shard, victim

from raycollapse.diffusion.checkpoint import load_checkpoint
from raycollapse.diffusion.sampling import resolve_labels, sample_images
from raycollapse.errors import UserInputError
from raycollapse.stages.generate import (
    GenerateStage,
    generate_pool,
    plan_generation,
    sample_identity,
    sample_settings,
    shard_specs,
)
from raycollapse.stages.shard_job import run_shard_job

SAMPLE = {"sampler": "ddim", "steps": 4, "eta": 0.5, "group_size": 4}  # fast; stochastic DDIM


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A class-conditional tiny UNet with random weights (sampling cost does not need training)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", class_conditional=True)


def _read_pool(folder) -> pa.Table:
    names = sorted(f for f in os.listdir(folder) if f.startswith("part-"))
    return pa.concat_tables(pq.read_table(os.path.join(folder, f)) for f in names)


def _decode(table: pa.Table) -> np.ndarray:
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(b)))[..., None]
            for b in table.column("image").to_pylist()
        ]
    )


def test_shard_specs():
    assert shard_specs(10, 4) == [
        {"shard": 0, "id_start": 0, "id_end": 4},
        {"shard": 1, "id_start": 4, "id_end": 8},
        {"shard": 2, "id_start": 8, "id_end": 10},
    ]
    with pytest.raises(UserInputError):
        shard_specs(0, 4)


def test_pool_identity_keeps_older_pools_valid():
    """Pools written before sample.precision / sample.compile existed (fp32, eager) keep their
    signature under the defaults; other values are part of a pool's identity."""
    default = sample_identity(sample_settings(None))
    assert list(default) == ["sampler", "steps", "eta", "guidance", "label", "group_size"]
    assert default == {"sampler": "ddim", "steps": 100, "eta": 1.0, "guidance": None,
                       "label": None, "group_size": 64}  # fmt: skip
    other = sample_identity(sample_settings({"precision": "bf16", "compile": True}))
    assert other == {**default, "precision": "bf16", "compile": True}
    assert sample_identity(sample_settings({"precision": "fp32"}))["precision"] == "fp32"


def test_process_batch_without_ray_equals_core_sampler(ckpt, tmp_path):
    stage = GenerateStage(
        checkpoint=ckpt, out_uri=str(tmp_path), seed=3, iteration=2, sample=sample_settings(SAMPLE)
    )
    stage.setup()
    out = stage.process_batch(
        {"shard": np.array([1]), "id_start": np.array([4]), "id_end": np.array([10])}
    )
    # The node is "" without Ray; an earlier test of the session may have started a local one.
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    assert out["rows"].tolist() == [6] and out["node_id"].tolist() == [here]
    assert out["error"].tolist() == [""]
    assert out["shard"].tolist() == [os.path.join(str(tmp_path), "part-00001.parquet")]
    table = pq.read_table(tmp_path / "part-00001.parquet")
    assert table.column_names == ["id", "image", "label", "iteration", "seed"]
    ids = np.arange(4, 10)
    np.testing.assert_array_equal(table.column("id").to_numpy(), ids)
    np.testing.assert_array_equal(table.column("label").to_numpy(), ids % 10)
    assert set(table.column("iteration").to_pylist()) == {2} and set(
        table.column("seed").to_pylist()
    ) == {3}
    c = load_checkpoint(ckpt)

    def labels_for(i):
        return resolve_labels(i, class_conditional=True, num_classes=10)

    expected = sample_images(c.unet, c.scheduler, ids, seed=3, sampler="ddim", steps=4, eta=0.5,
                             labels_for=labels_for, null_label=10, group_size=4)  # fmt: skip
    np.testing.assert_array_equal(_decode(table), expected)


@pytest.mark.slow
def test_pool_identical_with_1_and_2_actors_and_resume(ckpt, tmp_path, ray_local):
    one = generate_pool(
        ckpt, tmp_path / "one", 48, seed=7, sample_cfg=SAMPLE, actors=1, shard_size=16
    )
    two = generate_pool(
        ckpt, tmp_path / "two", 48, seed=7, sample_cfg=SAMPLE, actors=2, shard_size=13
    )
    # 13 rounds up to 16 (whole groups of 4), so both pools have the same 3 shards
    assert one["shards"] == two["shards"] == 3 and two["shard_size"] == 16 and two["actors"] == 2
    assert one["rows_generated"] == 48 and one["images_per_second"] > 0 and one["nodes"] == 1
    # actors=0: the same shards written in this process (no Ray Data)
    here = generate_pool(ckpt, tmp_path / "here", 48, seed=7, sample_cfg=SAMPLE, actors=0, shard_size=16)  # fmt: skip
    assert here["actors"] == 0 and here["shards_generated"] == 3 and here["rows_generated"] == 48
    for name in sorted(os.listdir(tmp_path / "one")):
        assert pq.read_table(tmp_path / "one" / name).equals(pq.read_table(tmp_path / "two" / name))
        assert pq.read_table(tmp_path / "one" / name).equals(
            pq.read_table(tmp_path / "here" / name)
        )
        assert (
            pq.read_schema(tmp_path / "one" / name).metadata
            == pq.read_schema(tmp_path / "here" / name).metadata
        )
    table = _read_pool(tmp_path / "one")
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(48))
    meta = json.loads(table.schema.metadata[b"raycollapse.generate"])
    assert meta["seed"] == 7 and meta["steps"] == 4 and meta["group_size"] == 4

    # resume: complete shards are skipped and not rewritten; a missing one is regenerated
    mtimes = {f: os.stat(tmp_path / "one" / f).st_mtime_ns for f in os.listdir(tmp_path / "one")}
    again = generate_pool(
        ckpt, tmp_path / "one", 48, seed=7, sample_cfg=SAMPLE, actors=2, shard_size=16
    )
    assert again["shards_skipped"] == 3 and again["rows_generated"] == 0
    os.remove(tmp_path / "one" / "part-00001.parquet")
    redo = generate_pool(
        ckpt, tmp_path / "one", 48, seed=7, sample_cfg=SAMPLE, actors=1, shard_size=16
    )
    assert redo["shards_generated"] == 1 and redo["rows_generated"] == 16
    assert (
        os.stat(tmp_path / "one" / "part-00000.parquet").st_mtime_ns == mtimes["part-00000.parquet"]
    )
    assert pq.read_table(tmp_path / "one" / "part-00001.parquet").equals(
        pq.read_table(tmp_path / "two" / "part-00001.parquet")
    )
    # another pool (other seed) into the same folder is refused before any work
    with pytest.raises(UserInputError, match="different pool"):
        generate_pool(ckpt, tmp_path / "one", 48, seed=8, sample_cfg=SAMPLE, shard_size=16)


def test_bad_checkpoint_fails_before_ray(ckpt, tmp_path):
    """No Ray fixture: these must fail on the driver before Ray is touched."""
    with pytest.raises(UserInputError, match="does not exist"):
        generate_pool(tmp_path / "missing", tmp_path / "o", 8, seed=0, sample_cfg=SAMPLE)
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "x.txt").write_text("hello")
    with pytest.raises(UserInputError, match="not a raycollapse checkpoint"):
        generate_pool(tmp_path / "notamodel", tmp_path / "o", 8, seed=0, sample_cfg=SAMPLE)
    (tmp_path / "notamodel" / "raycollapse.json").write_bytes(
        (Path(ckpt) / "raycollapse.json").read_bytes()
    )
    with pytest.raises(UserInputError, match="is not a model"):  # metadata but no weights
        generate_pool(tmp_path / "notamodel", tmp_path / "o", 8, seed=0, sample_cfg=SAMPLE)


def test_bad_sampling_settings_and_resources(ckpt, tmp_path, ray_local):
    with pytest.raises(UserInputError, match="out of range"):
        generate_pool(ckpt, tmp_path / "o", 8, seed=0, sample_cfg={**SAMPLE, "label": 12})
    with pytest.raises(UserInputError, match="steps"):
        generate_pool(ckpt, tmp_path / "o", 8, seed=0, sample_cfg={**SAMPLE, "steps": 5000})
    # ray_local has no GPU: the request can never be met, so it fails instead of waiting forever
    with pytest.raises(UserInputError, match="GPU"):
        generate_pool(ckpt, tmp_path / "o", 8, seed=0, sample_cfg=SAMPLE, gpus_per_actor=2)
    with pytest.raises(UserInputError, match="CPU"):
        generate_pool(ckpt, tmp_path / "o", 8, seed=0, sample_cfg=SAMPLE, actors=3)
    assert not (tmp_path / "o").exists()


def _pool_actors(alive: bool = True) -> dict[str, dict]:
    """The generation pool's actors by id (``alive``: only the running ones).

    ``ray.util.state.list_actors`` needs the dashboard, which the test Ray runs without; the GCS
    table behind ``ray._private.state`` answers without it.
    """
    import ray._private.state as state

    return {
        a["ActorID"]: a for a in state.actors().values()
        if a["ActorClassName"].startswith("MapWorker(MapBatches(_StageWorker")
        and (a["State"] == "ALIVE" or not alive)
    }  # fmt: skip


def _same_files(a: Path, b: Path) -> None:
    """The same visible shard files, byte for byte (data and metadata)."""
    names = sorted(f for f in os.listdir(a) if f.startswith("part-"))
    assert names == sorted(f for f in os.listdir(b) if f.startswith("part-"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference_pool(ckpt, tmp_path_factory) -> Path:
    """48 samples in 12 shards, generated without interruption on one actor."""
    from conftest import start_local_ray

    start_local_ray()
    out = tmp_path_factory.mktemp("reference") / "pool"
    m = generate_pool(ckpt, out, 48, seed=1, sample_cfg=SAMPLE, actors=1, shard_size=4)
    assert m["stage_retries"] == 0 and m["shards_generated"] == 12
    return out


@pytest.mark.slow
@pytest.mark.parametrize("no_restart", [True, False], ids=["killed-for-good", "killed-restarted"])
def test_killed_actor_mid_shard_every_id_once(
    ckpt, tmp_path, ray_local, reference_pool, no_restart
):
    """An actor of a 2-actor pool kills itself while its first shard is in progress (a hook).

    - ``no_restart=True`` (ray.kill's default): the actor is gone for good. Ray Data fails the
      job with ActorDiedError and the runner runs it again for the shards not yet on disk:
      exactly one stage retry, done by new actors;
    - ``no_restart=False``: Ray restarts the actor (Ray Data's pool sets ``max_restarts=-1``,
      ``max_task_retries=-1``) and retries the shard in flight inside the same job.

    Either way the pool is byte for byte the uninterrupted one.
    """
    before = set(_pool_actors(alive=False))
    job = plan_generation(ckpt, tmp_path / "pool", 48, seed=1, sample_cfg=SAMPLE, actors=2, shard_size=4)  # fmt: skip
    (tmp_path / "marks").mkdir()
    job.stage = kill_mid_shard(job.stage, tmp_path / "marks", no_restart=no_restart)
    result = run_shard_job(job)
    killed = victim(tmp_path / "marks")
    assert result.shards_written == 12 and result.rows_written == 48
    assert result.stage_retries == (1 if no_restart else 0)
    _same_files(tmp_path / "pool", reference_pool)
    # a killed writer may leave a hidden temporary file, never a visible partial shard
    assert all(f.startswith(("part-", ".part-")) for f in os.listdir(tmp_path / "pool"))
    actors = _pool_actors(alive=False)
    assert killed in set(actors) - before
    if no_restart:
        assert actors[killed]["State"] == "DEAD"
        assert len(set(actors) - before) > 2  # a new actor did the rest
    else:
        assert actors[killed]["NumRestarts"] >= 1  # the same actor, restarted


@pytest.mark.slow
def test_actors_spread_over_nodes(ckpt, tmp_path, ray_cluster):
    """3 simulated nodes with 1 CPU each: 3 one-CPU actors run on more than one node."""
    res = generate_pool(ckpt, tmp_path / "o", 24, seed=0, sample_cfg=SAMPLE, actors=3, shard_size=4)
    assert res["shards_generated"] == 6 and res["actors"] == 3
    assert res["nodes"] > 1, res["node_ids"]
    # each node has 1 logical GPU: 2 per actor never fits on a node, 4 actors never fit at all
    with pytest.raises(UserInputError, match="GPU"):
        generate_pool(ckpt, tmp_path / "o2", 8, seed=0, sample_cfg=SAMPLE, gpus_per_actor=2)
    with pytest.raises(UserInputError, match="GPU"):
        generate_pool(
            ckpt, tmp_path / "o2", 8, seed=0, sample_cfg=SAMPLE, actors=4, gpus_per_actor=1
        )
