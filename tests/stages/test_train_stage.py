"""The training stage: its pieces without Ray, and train_distributed on Ray Train (local Ray).

One worker is checked bit for bit against the in-process ``train_loop`` seeded with
``rank_seed(seed, 0)``: the same loop, the same data order, no all-reduce. That reference is
cheap, and it makes "fine-tuning starts from the base weights" and "a killed and restarted run
ends like an uninterrupted one" exact comparisons.
"""

from __future__ import annotations

import filecmp
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch

from raycollapse.config import load_config
from raycollapse.data.records import Records
from raycollapse.data.sources import load_records
from raycollapse.diffusion.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from raycollapse.diffusion.sampling import diffusion_loss, images_to_tensor, make_scheduler
from raycollapse.diffusion.trainer import train_loop
from raycollapse.diffusion.unet import build_unet
from raycollapse.errors import UserInputError
from raycollapse.seeds import derive_rng
from raycollapse.stages.train import RUN_FILE, STATE_FILE, train_distributed
from raycollapse.stages.train_data import (
    ShardStream,
    batch_to_arrays,
    rank_seed,
    read_shard,
    training_dataset,
)
from raycollapse.stages.train_local import train_in_process

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe: up to 40x slower

# Step callbacks defined here run inside Ray Train workers, which cannot import tests/: pickle
# this module's functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

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


def _reference(cfg, images, model=None):
    """The in-process train_loop as one Ray Train worker runs it: ``(model, EMA, losses)``."""
    t, m = cfg.train, cfg.model
    if model is None:
        model = build_unet(m.preset, resolution=8, channels=1, seed=m.seed)
    ema, res = train_loop(
        model, images, None, noise_scheduler=make_scheduler(), steps=t.steps,
        batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        ema_decay=t.ema_decay, grad_clip=t.grad_clip, mixed_precision=t.mixed_precision,
        seed=rank_seed(t.seed, 0),
    )  # fmt: skip
    averaged = build_unet(m.preset, resolution=8, channels=1)
    ema.copy_to(averaged)
    return model, averaged, res.losses


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def _final_state(run_dir: Path, steps: int):
    state = load_training_state(run_dir / f"step-{steps:08d}" / STATE_FILE)
    model = build_unet("tiny", resolution=8, channels=1)
    model.load_state_dict(state["model"])
    return model, state["losses"]


def _eval_loss(model, images):
    """The loss on fixed (image, noise, timestep) draws: the same for every model compared."""
    x = images_to_tensor(images)
    with torch.no_grad():
        losses = [
            diffusion_loss(
                model.eval(), make_scheduler(), x, generator=torch.Generator().manual_seed(s)
            )
            for s in range(4)
        ]
    return float(np.mean(losses))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_train_with_workers(tmp_path, ray_local, digits, workers):
    cfg = _cfg(f"train.workers={workers}")
    out = train_distributed(
        cfg, digits, tmp_path / "ckpt", storage_path=tmp_path / "ray", run_name="r"
    )
    assert out["steps"] == 30 and out["start_step"] == 0 and out["workers"] == workers
    assert out["batch_size"] == 16 and out["images_per_second"] > 0
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
    if workers == 1:  # the in-process loop, bit for bit: weights, EMA weights and every loss
        model, averaged, losses = _reference(cfg, digits.images)
        trained, got_losses = _final_state(tmp_path / "ray" / "r", 30)
        assert got_losses == losses
        _assert_same_weights(trained, model)
        _assert_same_weights(ckpt.unet, averaged)
        # train.launcher=process (stages/train_local.py) writes the same checkpoint, file for
        # file and byte for byte (the config copies included: both ran the same config)
        here = train_in_process(cfg, digits, tmp_path / "here", storage_path=tmp_path / "st",
                                run_name="r")  # fmt: skip
        files = sorted(
            str(p.relative_to(out["checkpoint"]))
            for p in Path(out["checkpoint"]).rglob("*")
            if p.is_file()
        )
        assert any(f.endswith(".safetensors") for f in files) and files == sorted(
            str(p.relative_to(here["checkpoint"]))
            for p in Path(here["checkpoint"]).rglob("*")
            if p.is_file()
        )
        _, mismatch, errors = filecmp.cmpfiles(
            out["checkpoint"], here["checkpoint"], files, shallow=False
        )
        assert not mismatch and not errors, mismatch
    else:  # every rank saved its own RNG state into the merged checkpoint folder
        assert {p.name for p in (tmp_path / "ray" / "r" / "step-00000020").iterdir()} == {
            "train_state.pt", "rank_000.pt", "rank_001.pt"
        }  # fmt: skip
        # it learnt: 30 steps cut the loss on fixed draws ~4.5x (0.94 -> 0.2); asked: 1.5x
        init = build_unet("tiny", resolution=8, channels=1, seed=0)
        before, after = _eval_loss(init, digits.images), _eval_loss(ckpt.unet, digits.images)
        assert after < before / 1.5, (before, after)


class KillOnce:
    """A step callback that ends rank 0's process (a real death, not an exception) once."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def __call__(self, state) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        if state.step == self.step and rank == 0 and not self.marker.exists():
            self.marker.write_text(f"killed at step {state.step} in pid {os.getpid()}\n")
            os._exit(1)


@pytest.mark.slow
def test_killed_worker_resumes_to_the_uninterrupted_result(tmp_path, ray_local, digits):
    """Rank 0's process dies at step 25; Ray Train restarts it from the checkpoint of step 20.

    The restarted run ends bit for bit where an uninterrupted one does (weights, EMA, losses):
    with one worker the data order is fixed, and weights, optimiser, schedule, noise generator
    and index stream are all restored exactly. (With several workers Ray Data may hand the
    restarted group another partition of the rows; see stages/train.py.)
    """
    marker = tmp_path / "killed.txt"
    cfg = _cfg("train.workers=1", "train.max_failures=1")
    out = train_distributed(cfg, digits, tmp_path / "ckpt", storage_path=tmp_path / "ray", run_name="r",
                            callbacks=[KillOnce(25, marker)])  # fmt: skip
    assert marker.read_text().startswith("killed at step 25")  # the first attempt did die
    assert out["start_step"] == 20 and out["steps"] == 30  # resumed at the last checkpoint
    model, averaged, losses = _reference(cfg, digits.images)
    trained, got_losses = _final_state(tmp_path / "ray" / "r", 30)
    assert got_losses == losses
    _assert_same_weights(trained, model)
    _assert_same_weights(load_checkpoint(out["checkpoint"]).unet, averaged)


@pytest.mark.slow
def test_finetune_from_parquet_shards(tmp_path, ray_local, digits):
    """Parquet shards as the generation stage writes them; init=finetune from a saved model."""
    (tmp_path / "pool").mkdir()
    table = digits.to_arrow_table()
    for s in range(2):
        pq.write_table(table.slice(32 * s, 32), tmp_path / "pool" / f"part-{s:05d}.parquet")
    base = build_unet("tiny", resolution=8, channels=1, seed=1)  # not the scratch init (seed 0)
    meta = {
        "preset": "tiny",
        "resolution": 8,
        "channels": 1,
        "class_conditional": False,
        "num_classes": 10,
    }
    path = save_checkpoint(tmp_path / "base", base, make_scheduler(), meta)
    cfg = _cfg("train.steps=5", "train.checkpoint_every=0", "train.init=finetune")
    out = train_distributed(cfg, tmp_path / "pool", tmp_path / "ckpt", storage_path=tmp_path / "ray",
                            run_name="ft", init_from=path)  # fmt: skip
    ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt.meta["steps"] == 5 and ckpt.meta["data"]["source"] == str(tmp_path / "pool")
    # Started from the base weights: equal, bit for bit, to the in-process loop started there.
    start = build_unet("tiny", resolution=8, channels=1)
    start.load_state_dict(base.state_dict())
    model, averaged, losses = _reference(cfg, digits.images, model=start)
    trained, got_losses = _final_state(tmp_path / "ray" / "ft", 5)
    assert got_losses == losses
    _assert_same_weights(trained, model)
    _assert_same_weights(ckpt.unet, averaged)

    # and it stayed near them: closer to the base than the same steps from scratch
    def dist(a, b):
        return sum(
            ((x - y) ** 2).sum().item() for x, y in zip(a.parameters(), b.parameters(), strict=True)
        )

    scratch, _, _ = _reference(_cfg("train.steps=5"), digits.images)
    assert 0 < dist(trained, base) < dist(scratch, base) / 10
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
    with pytest.raises(UserInputError, match="needs train.init_from"):
        train_distributed(_cfg("train.init=finetune"), digits, tmp_path / "o", **kw)
    with pytest.raises(UserInputError, match="trained with 1000 diffusion steps"):
        cfg = _cfg("train.init=finetune", "diffusion.num_train_timesteps=500")
        train_distributed(cfg, digits, tmp_path / "o", init_from=base, **kw)
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


# ---------------------------------------------------------------------------------------------
# Ray Data input and streaming


def test_training_dataset_reads_parquet_through_ray_data(tmp_path, ray_local, digits):
    """Shards with and without labels, by URI, are read whole (values, nulls as -1); a shard
    without an image column is refused before any read."""
    table = digits.to_arrow_table()
    (tmp_path / "pool").mkdir()
    pq.write_table(table.slice(0, 40), tmp_path / "pool" / "part-00000.parquet")
    pq.write_table(
        table.slice(40).drop_columns(["label"]), tmp_path / "pool" / "part-00001.parquet"
    )
    expect = np.where(np.arange(len(digits)) < 40, digits.labels, -1)
    ds, labels, _ = training_dataset(f"file://{tmp_path / 'pool'}")  # local paths: finetune test
    rows = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    np.testing.assert_array_equal(rows.column("id").to_numpy(), digits.ids)
    assert rows.column("image").to_pylist() == table.column("image").to_pylist()
    np.testing.assert_array_equal(rows.column("label").fill_null(-1).to_numpy(), expect)
    np.testing.assert_array_equal(np.sort(labels), np.sort(expect))
    pq.write_table(table.slice(0, 4).drop_columns(["image"]), tmp_path / "pool" / "part-2.parquet")
    with pytest.raises(UserInputError, match=r"needs 'id' and 'image' \(or 'vector'\) columns"):
        training_dataset(tmp_path / "pool")


class ListShard:
    """A dataset shard as far as ``ShardStream`` cares: the same blocks in the same order."""

    def __init__(self, table: pa.Table, block: int) -> None:
        self.blocks = [table.slice(i, block) for i in range(0, table.num_rows, block)]

    def iter_batches(self, **_):
        yield from self.blocks


def _epochs(stream: ShardStream, n: int, epochs: int) -> list[np.ndarray]:
    """The images of ``epochs`` whole epochs (from the start of one), one array per epoch."""
    out = []
    for _ in range(epochs):
        images, _ = stream.next(n)
        out.append(images)
    return out


def test_shard_stream_is_a_seeded_resumable_shuffle(digits):
    table = digits.to_arrow_table()
    n, buffer = len(digits), 8
    row_of = {digits.images[i].tobytes(): i for i in range(n)}

    def order(images):
        return np.array([row_of[im.tobytes()] for im in images])

    stream = ShardStream(ListShard(table, 10), DATA, seed=3, buffer=buffer)
    epochs = [order(e) for e in _epochs(stream, n, 3)]
    for e in epochs:  # each epoch hands out every row once ...
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
        # ... and row i cannot leave before it was read: output position >= i - buffer
        assert (np.argsort(e) >= np.arange(n) - buffer).all()
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
    assert not np.array_equal(epochs[0], np.arange(n))  # shuffled
    again = ShardStream(ListShard(table, 32), DATA, seed=3, buffer=buffer)  # other blocks sizes
    np.testing.assert_array_equal(order(again.next(n)[0]), epochs[0])  # seeded by (seed, epoch)
    other = ShardStream(ListShard(table, 10), DATA, seed=4, buffer=buffer)
    assert not np.array_equal(order(other.next(n)[0]), epochs[0])
    # with the buffer holding the whole shard, epoch e is derive_rng(seed, e).permutation(n)
    whole = ShardStream(ListShard(table, 10), DATA, seed=3, buffer=n)
    for e in range(2):
        np.testing.assert_array_equal(order(whole.next(n)[0]), derive_rng(3, e).permutation(n))
    # resumed at any position (batches spanning epochs), it continues as the uninterrupted one
    full = np.concatenate(epochs)
    first = ShardStream(ListShard(table, 10), DATA, seed=3, buffer=buffer)
    got = [order(first.next(50)[0]), order(first.next(50)[0])]
    resumed = ShardStream(ListShard(table, 10), DATA, seed=3, buffer=buffer)
    resumed.seek(*first.position)
    assert first.position == (1, 36)
    got.append(order(resumed.next(70)[0]))
    np.testing.assert_array_equal(np.concatenate(got), full[:170])
    with pytest.raises(UserInputError, match="empty"):
        ShardStream(ListShard(table.slice(0, 0), 10), DATA, seed=0, buffer=4).next(1)


def _stream_reference(cfg, images: np.ndarray, steps: int):
    """Streamed training written out plainly: whole-shard buffer, so epoch e's rows are
    ``images[derive_rng(rank_seed, e).permutation(n)]``; returns the model and the losses."""
    from raycollapse.diffusion.train_parts import EMA, make_lr_schedule, make_optimizer
    from raycollapse.diffusion.trainer import train_step

    t, n = cfg.train, len(images)
    seed = rank_seed(t.seed, 0)
    rows = np.concatenate(
        [derive_rng(seed, e).permutation(n) for e in range(steps * t.batch_size // n + 1)]
    )
    model = build_unet("tiny", resolution=8, channels=1, seed=cfg.model.seed)
    opt = make_optimizer(model, t.lr, t.weight_decay)
    schedule, ema = make_lr_schedule(opt, t.warmup_steps, steps), EMA(model, t.ema_decay)
    gen, losses = torch.Generator().manual_seed(seed), []
    for s in range(steps):
        batch = images_to_tensor(images[rows[s * t.batch_size : (s + 1) * t.batch_size]])
        losses.append(train_step(model, batch, None, noise_scheduler=make_scheduler(), optimizer=opt,
                                 lr_schedule=schedule, ema=ema, generator=gen, grad_clip=t.grad_clip))  # fmt: skip
    return model, losses


@pytest.mark.slow
def test_streamed_training_resumes_exactly(tmp_path, ray_local, digits):
    """train.in_memory_gb=0 streams; rank 0 dies at step 7 and resumes from step 5's checkpoint
    (stream position included) to the result of the plainly written streamed loop."""
    (tmp_path / "pool").mkdir()
    pq.write_table(digits.to_arrow_table(), tmp_path / "pool" / "part-00000.parquet")
    marker = tmp_path / "killed.txt"
    cfg = _cfg("train.steps=10", "train.checkpoint_every=5", "train.max_failures=1",
               "train.in_memory_gb=0", f"train.stream_buffer={len(digits)}")  # fmt: skip
    out = train_distributed(cfg, tmp_path / "pool", tmp_path / "ckpt", storage_path=tmp_path / "ray",
                            run_name="s", callbacks=[KillOnce(7, marker)])  # fmt: skip
    assert marker.exists() and out["start_step"] == 5 and out["streamed"] is True
    rank = load_training_state(tmp_path / "ray" / "s" / "step-00000005" / "rank_000.pt")
    assert rank["stream_position"].tolist() == [1, 16]  # 5 x 16 rows of a 64-row epoch
    model, losses = _stream_reference(cfg, digits.images, 10)
    trained, got_losses = _final_state(tmp_path / "ray" / "s", 10)
    assert got_losses == losses
    _assert_same_weights(trained, model)
    with pytest.raises(UserInputError, match="on_small"):
        train_distributed(_cfg("train.in_memory_gb=0", "train.workers=2", "data.on_small=skip"),
                          tmp_path / "pool", tmp_path / "o", storage_path=tmp_path / "ray", run_name="x")  # fmt: skip
