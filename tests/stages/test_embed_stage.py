"""The embedding stage: process_batch without Ray, embed_pool on Ray Data (local and 3 nodes)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_hooks import kill_mid_shard, victim

from raycollapse.data.inputs import images_to_pixels, load_features
from raycollapse.errors import UserInputError
from raycollapse.stages.base import map_stage
from raycollapse.stages.embed import (
    EmbedShardStage,
    EmbedStage,
    embed_pool,
    features_dict,
    plan_embedding,
)
from raycollapse.stages.embed_inputs import ShardTask
from raycollapse.stages.shard_job import run_shard_job


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, channels), dtype=np.uint8)


def _write_pool(folder, shards: int = 3, rows: int = 10, *, image: bool = True) -> np.ndarray:
    """Parquet shards like the generation stage writes: id, image (PNG), label (nullable)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = _images(shards * rows)
    for s in range(shards):
        lo = s * rows
        cols = {
            "id": pa.array(np.arange(lo, lo + rows) + 1000, pa.int64()),
            "label": pa.array(
                [None if i % 4 == 0 else i % 10 for i in range(lo, lo + rows)], pa.int64()
            ),
        }
        if image:
            cols["image"] = pa.array([_png(im) for im in images[lo : lo + rows]], pa.binary())
        pq.write_table(pa.table(cols), folder / f"part-{s:05d}.parquet")
    return images


def _read_out(folder) -> pa.Table:
    return pa.concat_tables(pq.read_table(folder / f) for f in sorted(os.listdir(folder)))


def test_process_batch_without_ray():
    stage = EmbedStage(features=features_dict({"name": "pixel", "batch_size": 4}))
    stage.setup()
    images = _images(6)
    out = stage.process_batch(
        {"id": np.arange(6) + 5, "image": np.array([_png(im) for im in images], dtype=object)}
    )
    assert set(out) == {"id", "embedding"}
    np.testing.assert_array_equal(out["id"], np.arange(6) + 5)
    np.testing.assert_array_equal(out["embedding"], images_to_pixels(images))


def test_shard_stage_without_ray(tmp_path):
    """One ShardTask row in, one shard out: the status names it, the file holds the pixels."""
    images = _images(5)
    np.save(tmp_path / "x.npy", images)
    stage = EmbedShardStage(features=features_dict({"name": "pixel", "batch_size": 2}))
    stage.setup()
    task = ShardTask("npy", str(tmp_path / "x.npy"), 1, 4, str(tmp_path / "o.parquet"), 1)
    out = stage.process_batch({k: np.array([v]) for k, v in task.to_item().items()})
    assert out["shard"].tolist() == [task.out] and out["rows"].tolist() == [3]
    table = pq.read_table(task.out)
    np.testing.assert_array_equal(table.column("id").to_numpy(), [1, 2, 3])
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(emb, images_to_pixels(images[1:4]))


def test_setup_error_is_the_users_message(tmp_path, ray_local):
    """Weights that do not fit the model: setup fails in the actor; embed_pool raises the
    loader's message once, as a UserInputError without Ray's wrapping, and writes nothing."""
    import torch
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    features = {"name": "dinov2", "pretrained": str(tmp_path / "bad.safetensors")}
    stage = EmbedShardStage(features=features_dict(features))
    with pytest.raises(UserInputError, match="do not fit") as direct:
        stage.setup()
    _write_pool(tmp_path / "pool", shards=2, rows=2)
    with pytest.raises(UserInputError) as info:
        embed_pool(tmp_path / "pool", tmp_path / "o", features, actors=2)
    assert str(info.value) == str(direct.value)  # the message alone: no traceback, no prefix
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_map_stage_refuses_a_batch_without_a_declared_column(ray_local):
    """EmbedStage reads 'image': a dataset without it fails naming the column."""
    import ray

    ds = ray.data.from_items([{"id": i, "picture": b""} for i in range(3)])
    stage = EmbedStage(features=features_dict({"name": "pixel"}))
    with pytest.raises(UserInputError, match=r"no column 'image' \(it has: id, picture\)"):
        map_stage(ds, stage, actors=1).materialize()


def test_embed_pool_actors_identical_resume_and_labels(tmp_path, ray_local):
    images = _write_pool(tmp_path / "pool")
    one = embed_pool(
        tmp_path / "pool", tmp_path / "one", {"name": "pixel", "batch_size": 4}, actors=1
    )
    two = embed_pool(
        tmp_path / "pool", tmp_path / "two", {"name": "pixel", "batch_size": 7}, actors=2
    )
    assert one["shards"] == two["shards"] == 3 and one["rows"] == 30 and one["dim"] == 64
    assert two["actors"] == 2 and one["images_per_second"] > 0
    here = embed_pool(tmp_path / "pool", tmp_path / "here", {"name": "pixel"}, actors=0)
    assert here["actors"] == 0 and here["shards"] == 3 and here["rows"] == 30
    for name in sorted(os.listdir(tmp_path / "pool")):
        a, b = pq.read_table(tmp_path / "one" / name), pq.read_table(tmp_path / "two" / name)
        assert a.column("id").equals(b.column("id")) and a.column("embedding").equals(
            b.column("embedding")
        )
        assert pq.read_table(tmp_path / "here" / name).equals(a)  # in this process: the same
    table = _read_out(tmp_path / "one")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    meta = table.schema.metadata
    assert meta[b"raycollapse.features"] == b"pixel" and meta[b"raycollapse.dim"] == b"64"
    assert json.loads(meta[b"raycollapse.embedding"])["features"] == "pixel"
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(30) + 1000)
    assert table.column("label").null_count == 8  # labels pass through, nulls kept
    loaded = load_features(tmp_path / "one")  # what `raycollapse entropy OUT` reads
    np.testing.assert_array_equal(loaded.features, images_to_pixels(images))

    # resume: complete shards are skipped and not rewritten; a missing one is redone
    mtimes = {f: os.stat(tmp_path / "one" / f).st_mtime_ns for f in os.listdir(tmp_path / "one")}
    again = embed_pool(
        tmp_path / "pool", tmp_path / "one", {"name": "pixel", "batch_size": 4}, actors=2
    )
    assert (
        again["shards_skipped"] == 3
        and again["shards_embedded"] == 0
        and again["rows_embedded"] == 0
    )
    assert {
        f: os.stat(tmp_path / "one" / f).st_mtime_ns for f in os.listdir(tmp_path / "one")
    } == mtimes
    os.remove(tmp_path / "one" / "part-00001.parquet")
    redo = embed_pool(tmp_path / "pool", tmp_path / "one", {"name": "pixel"}, actors=1)
    assert redo["shards_embedded"] == 1 and redo["shards_skipped"] == 2
    assert (
        os.stat(tmp_path / "one" / "part-00000.parquet").st_mtime_ns == mtimes["part-00000.parquet"]
    )

    # another feature space into the same folder is refused before any work
    with pytest.raises(UserInputError, match="already holds different embeddings"):
        embed_pool(
            tmp_path / "pool", tmp_path / "one", {"name": "pixel", "dtype": "float16"}, actors=1
        )


def test_npy_and_image_folder_inputs(tmp_path, ray_local):
    images = _images(9, seed=3, channels=3)
    np.save(tmp_path / "imgs.npy", images)
    res = embed_pool(
        tmp_path / "imgs.npy", tmp_path / "o1", {"name": "pixel", "dtype": "float16"}, shard_rows=4
    )
    assert res["shards"] == 3 and sorted(os.listdir(tmp_path / "o1"))[-1] == "part-00002.parquet"
    table = _read_out(tmp_path / "o1")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 192)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(9))
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(emb, images_to_pixels(images).astype(np.float16))

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images[:5]):
        Image.fromarray(im).save(folder / f"img{i}.png")
    res = embed_pool(folder, tmp_path / "o2", {"name": "pixel"}, shard_rows=2, actors=2)
    assert res["shards"] == 3 and res["rows"] == 5
    np.testing.assert_array_equal(
        load_features(tmp_path / "o2").features, images_to_pixels(images[:5])
    )


def test_bad_inputs(tmp_path, ray_local):
    _write_pool(tmp_path / "noimg", shards=1, image=False)
    with pytest.raises(UserInputError, match="no 'image' column"):
        embed_pool(tmp_path / "noimg", tmp_path / "o", {"name": "pixel"})
    with pytest.raises(UserInputError, match="GPU"):
        embed_pool(tmp_path / "noimg", tmp_path / "o", {"name": "pixel"}, gpus_per_actor=1)
    np.save(tmp_path / "emb.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(UserInputError, match="not images"):
        embed_pool(tmp_path / "emb.npy", tmp_path / "o", {"name": "pixel"})
    with pytest.raises(UserInputError, match="does not exist"):
        embed_pool(tmp_path / "missing", tmp_path / "o", {"name": "pixel"})
    # a corrupt image fails its shard with a message naming the shard and row; good shards stay
    (tmp_path / "corrupt").mkdir()
    pq.write_table(
        pa.table(
            {"id": pa.array([0, 1], pa.int64()), "image": pa.array([_png(_images(1)[0]), b"junk"])}
        ),
        tmp_path / "corrupt" / "part-00000.parquet",
    )
    with pytest.raises(UserInputError, match=r"part-00000.parquet.*row 1"):
        embed_pool(tmp_path / "corrupt", tmp_path / "o3", {"name": "pixel"})
    assert not (tmp_path / "o3" / "part-00000.parquet").exists()


def test_cli_embed(tmp_path, ray_local, capsys):
    from raycollapse.cli.main import main

    images = _images(5)
    np.save(tmp_path / "imgs.npy", images)
    rc = main(
        [
            "embed",
            str(tmp_path / "imgs.npy"),
            "--features",
            "pixel",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 5 and result["features"] == "pixel"
    rc = main(["embed", str(tmp_path / "imgs.npy"), "--features", "clip", "--out", str(tmp_path / "o2"),
               "--pretrained", str(tmp_path / "missing.safetensors")])  # fmt: skip
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("no_restart", [True, False], ids=["killed-for-good", "killed-restarted"])
def test_killed_actor_mid_shard(tmp_path, ray_local, no_restart):
    """One actor of two kills itself while embedding a shard (a test hook): one stage retry
    when it is gone for good, none when Ray restarts it; the output is the uninterrupted one."""
    _write_pool(tmp_path / "pool", shards=6, rows=4)
    features = {"name": "pixel", "batch_size": 2}
    ref = embed_pool(tmp_path / "pool", tmp_path / "ref", features, actors=1)
    assert ref["stage_retries"] == 0
    job = plan_embedding(tmp_path / "pool", tmp_path / "o", features, actors=2)
    (tmp_path / "marks").mkdir()
    job.stage = kill_mid_shard(job.stage, tmp_path / "marks", no_restart=no_restart)
    result = run_shard_job(job)
    assert victim(tmp_path / "marks")
    assert result.stage_retries == (1 if no_restart else 0) and result.shards_written == 6
    names = sorted(f for f in os.listdir(tmp_path / "ref"))
    assert names == sorted(f for f in os.listdir(tmp_path / "o") if f.startswith("part-"))
    for name in names:
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


@pytest.mark.slow
def test_actors_spread_over_nodes(tmp_path, ray_cluster):
    """On 3 simulated nodes (1 CPU each), 3 one-CPU actors must run on more than one node."""
    _write_pool(tmp_path / "pool", shards=6, rows=4)
    res = embed_pool(tmp_path / "pool", tmp_path / "o", {"name": "pixel"}, actors=3)
    assert res["shards_embedded"] == 6 and res["actors"] == 3
    assert res["nodes"] > 1, res["node_ids"]
    # GPU actors: the cluster has 3 logical GPUs, so 4 GPU actors can never be placed
    with pytest.raises(UserInputError, match="GPU"):
        embed_pool(
            tmp_path / "pool", tmp_path / "o4", {"name": "pixel"}, actors=4, gpus_per_actor=1
        )
