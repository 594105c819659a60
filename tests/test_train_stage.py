"""The training stage: its pieces without Ray, and train_distributed on Ray Train (local Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycollapse.config import load_config
from raycollapse.data.records import Records, load_records
from raycollapse.diffusion.checkpoint import load_checkpoint, save_checkpoint
from raycollapse.diffusion.sampling import make_scheduler
from raycollapse.diffusion.unet import build_unet
from raycollapse.errors import UserInputError
from raycollapse.stages.train import RUN_FILE, train_distributed
from raycollapse.stages.train_data import batch_to_arrays, rank_seed, read_shard

FAST = [
    "data.n=64",
    "train.steps=30",
    "train.batch_size=16",
    "train.checkpoint_every=10",
    "train.warmup_steps=2",
]


def _cfg(*overrides: str):
    return load_config(overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def digits() -> Records:
    return load_records(_cfg().data)


DATA = {"resolution": 8, "channels": 1, "on_small": "error"}


def test_batch_to_arrays_png_and_tensor_columns(digits):
    labels = digits.labels.copy()
    labels[::5] = -1
    rec = Records(digits.ids, digits.images, labels, "digits")
    ids, images, got = batch_to_arrays(rec.to_arrow_table(), DATA)  # PNG bytes, nullable labels
    np.testing.assert_array_equal(ids, rec.ids)
    np.testing.assert_array_equal(images, rec.images)
    np.testing.assert_array_equal(got, labels)
    from ray.data.extensions import ArrowTensorArray

    tensor = pa.table({"id": pa.array(rec.ids), "image": ArrowTensorArray.from_numpy(rec.images)})
    ids, images, got = batch_to_arrays(tensor, DATA)  # no label column: -1 everywhere
    np.testing.assert_array_equal(images, rec.images)
    assert (got == -1).all()
    # images below the resolution: refused naming the id, or dropped with on_small=skip
    with pytest.raises(UserInputError, match=f"id {rec.ids[0]}'"):
        batch_to_arrays(rec.to_arrow_table(), {**DATA, "resolution": 16})
    ids, images, _ = batch_to_arrays(
        rec.to_arrow_table(), {**DATA, "resolution": 16, "on_small": "skip"}
    )
    assert len(ids) == 0 and images.shape == (0, 16, 16, 1)


def test_read_shard_sorts_by_id_and_rank_seeds(digits):
    table = digits.to_arrow_table()

    class FakeShard:  # what ray.train.get_dataset_shard returns, as far as read_shard cares
        def iter_batches(self, **_):
            yield table.slice(32)  # blocks may arrive in any order
            yield table.slice(0, 32)

    ids, images, labels = read_shard(FakeShard(), DATA)
    np.testing.assert_array_equal(ids, digits.ids)
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.labels)
    assert len({rank_seed(0, r) for r in range(4)}) == 4 and rank_seed(0, 1) == rank_seed(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_train_with_workers(tmp_path, ray_local, digits, workers):
    cfg = _cfg(f"train.workers={workers}")
    out = train_distributed(
        cfg, digits, tmp_path / "ckpt", storage_path=tmp_path / "ray", run_name="r"
    )
    assert out["steps"] == 30 and out["start_step"] == 0 and out["workers"] == workers
    assert out["batch_size"] == 16 and out["images_per_second"] > 0
    assert np.isfinite(out["loss_first"]) and np.isfinite(out["loss_last"])
    assert out["loss_last"] < out["loss_first"]
    ckpt = load_checkpoint(
        out["checkpoint"], expect={"preset": "tiny", "resolution": 8, "channels": 1}
    )
    assert (
        ckpt.meta["steps"] == 30
        and ckpt.meta["workers"] == workers
        and ckpt.meta["data"]["n"] == 64
    )
    steps = sorted(p.name for p in (tmp_path / "ray" / "r").glob("step-*"))
    assert steps == ["step-00000020", "step-00000030"]  # every 10 steps, the last 2 kept
    if workers == 2:  # every rank saved its own RNG state into the merged checkpoint folder
        assert {p.name for p in (tmp_path / "ray" / "r" / "step-00000020").iterdir()} == {
            "train_state.pt", "rank_000.pt", "rank_001.pt"
        }  # fmt: skip


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_local, digits):
    """Rank 0's process exits (os._exit) at step 25; Ray Train restarts the group from step 20."""
    marker = tmp_path / "killed.txt"
    cfg = _cfg("train.workers=2", "train.max_failures=1")
    out = train_distributed(cfg, digits, tmp_path / "ckpt", storage_path=tmp_path / "ray", run_name="r",
                            fail_once_at=(25, str(marker)))  # fmt: skip
    assert marker.read_text().startswith("killed at step 25")  # the first attempt did die
    assert out["start_step"] == 20 and out["steps"] == 30  # resumed at the last checkpoint
    assert np.isfinite(out["loss_last"])
    assert load_checkpoint(out["checkpoint"]).meta["steps"] == 30


@pytest.mark.slow
def test_finetune_from_parquet_shards(tmp_path, ray_local, digits):
    """Parquet shards as the generation stage writes them; init=finetune from a saved model."""
    (tmp_path / "pool").mkdir()
    table = digits.to_arrow_table()
    for s in range(2):
        pq.write_table(table.slice(32 * s, 32), tmp_path / "pool" / f"part-{s:05d}.parquet")
    unet = build_unet("tiny", resolution=8, channels=1, seed=1)
    meta = {
        "preset": "tiny",
        "resolution": 8,
        "channels": 1,
        "class_conditional": False,
        "num_classes": 10,
    }
    base = save_checkpoint(tmp_path / "base", unet, make_scheduler(), meta)
    cfg = _cfg("train.steps=5", "train.checkpoint_every=0", "train.init=finetune")
    out = train_distributed(cfg, tmp_path / "pool", tmp_path / "ckpt", storage_path=tmp_path / "ray",
                            run_name="ft", init_from=base)  # fmt: skip
    ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt.meta["steps"] == 5 and ckpt.meta["data"]["source"] == str(tmp_path / "pool")
    # fine-tuning moved the weights away from the base model's
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(ckpt.unet.parameters(), unet.parameters(), strict=True)
    ]
    assert max(moved) > 0
    # a corrupt image fails inside a worker: Ray Train's wrapper is unwrapped to the user error
    bad = table.slice(0, 4).set_column(1, "image", pa.array([b"junk"] * 4, pa.binary()))
    pq.write_table(bad, tmp_path / "pool" / "part-00002.parquet")
    with pytest.raises(UserInputError, match=r"cannot read image 'id \d+'"):
        train_distributed(_cfg("train.steps=5", "train.max_failures=0"), tmp_path / "pool",
                          tmp_path / "ckpt2", storage_path=tmp_path / "ray", run_name="bad")  # fmt: skip


def test_bad_inputs(tmp_path, ray_local, digits):
    meta = {
        "preset": "tiny",
        "resolution": 8,
        "channels": 1,
        "class_conditional": False,
        "num_classes": 10,
    }
    base = save_checkpoint(
        tmp_path / "base", build_unet("tiny", resolution=8, channels=1), make_scheduler(), meta
    )
    kw = {"storage_path": tmp_path / "ray", "run_name": "r"}
    with pytest.raises(UserInputError, match="does not exist"):
        train_distributed(
            _cfg("train.init=finetune"), digits, tmp_path / "o", init_from=tmp_path / "nope", **kw
        )
    with pytest.raises(UserInputError, match="does not match"):
        cfg = _cfg("train.init=finetune", "model.class_conditional=true")
        train_distributed(cfg, digits, tmp_path / "o", init_from=base, **kw)
    with pytest.raises(UserInputError, match="CPU"):  # ray_local has 2 CPUs: never 3 workers
        train_distributed(_cfg("train.workers=3"), digits, tmp_path / "o", **kw)
    with pytest.raises(UserInputError, match="GPU"):
        train_distributed(_cfg("train.use_gpu=true"), digits, tmp_path / "o", **kw)
    with pytest.raises(UserInputError, match="no Parquet files"):
        train_distributed(_cfg(), tmp_path / "empty", tmp_path / "o", **kw)
    unlabelled = Records(digits.ids, digits.images, np.full(len(digits), -1), "x")
    with pytest.raises(UserInputError, match="no label"):
        train_distributed(_cfg("model.class_conditional=true"), unlabelled, tmp_path / "o", **kw)
    # a Ray Train run folder of another training is refused, not resumed
    (tmp_path / "ray" / "r").mkdir(parents=True)
    (tmp_path / "ray" / "r" / RUN_FILE).write_text(json.dumps({"steps": 1}))
    with pytest.raises(UserInputError, match="belongs to another training"):
        train_distributed(_cfg(), digits, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()
