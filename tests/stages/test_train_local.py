"""Training in the calling process (``train.launcher``): the weights Ray Train's single worker
trains, bit for bit, without Ray; resumable; the launcher rules.

The reference is the plain ``train_loop`` seeded with ``rank_seed(seed, 0)`` on the set sorted by
id (what tests/stages/test_train_stage.py checks Ray Train's one worker against; that test
also checks that both launchers write byte-identical checkpoint folders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raycollapse.config import load_config
from raycollapse.config.checks import check_train, resolve_launcher
from raycollapse.data.records import Records
from raycollapse.data.sources import load_records
from raycollapse.diffusion.checkpoint import load_checkpoint, load_training_state
from raycollapse.diffusion.sampling import make_scheduler
from raycollapse.diffusion.trainer import train_loop
from raycollapse.diffusion.unet import build_unet
from raycollapse.errors import UserInputError
from raycollapse.stages.train_data import rank_seed
from raycollapse.stages.train_local import (
    STATE_FILE,
    choose_launcher,
    read_training_set,
    train_in_process,
)

# The reference runs with the thread count of a 1-CPU Ray Train worker, which train_in_process
# uses too (float sums in other thread blockings would round differently).
torch.set_num_threads(1)

FAST = ["data.n=64", "train.steps=30", "train.batch_size=16", "train.checkpoint_every=10",
        "train.warmup_steps=2"]  # fmt: skip


def _cfg(*overrides: str):
    return load_config(overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def digits() -> Records:
    return load_records(_cfg().data)


@pytest.fixture
def shards(tmp_path, digits) -> Path:
    """The 64 digits as two Parquet shards written in reverse id order (the reader sorts)."""
    table = digits.to_arrow_table()
    (tmp_path / "set").mkdir()
    pq.write_table(table.slice(32, 32), tmp_path / "set" / "part-00000.parquet")
    pq.write_table(table.slice(0, 32), tmp_path / "set" / "part-00001.parquet")
    return tmp_path / "set"


def _reference(cfg, images):
    """Plain train_loop as Ray Train's rank 0 runs it: ``(EMA-averaged model, losses)``."""
    t, m = cfg.train, cfg.model
    model = build_unet(m.preset, resolution=8, channels=1, seed=m.seed)
    ema, res = train_loop(
        model, images, None, noise_scheduler=make_scheduler(), steps=t.steps,
        batch_size=t.batch_size, lr=t.lr, warmup_steps=t.warmup_steps, ema_decay=t.ema_decay,
        grad_clip=t.grad_clip, seed=rank_seed(t.seed, 0),
    )  # fmt: skip
    averaged = build_unet(m.preset, resolution=8, channels=1)
    ema.copy_to(averaged)
    return averaged, res.losses


def _same_weights(a, b) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


class CrashAt:
    """A step callback that raises once at ``step`` (a crash of the calling process's run)."""

    def __init__(self, step: int) -> None:
        self.step, self.fired = step, False

    def __call__(self, state) -> None:
        if state.step == self.step and not self.fired:
            self.fired = True
            raise RuntimeError(f"crash at step {state.step}")


def test_reads_the_set_sorted_by_id(shards, digits):
    ids, images, labels, source, vector = read_training_set(shards, _cfg().data)
    np.testing.assert_array_equal(ids, digits.ids)
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.labels)
    assert source == str(shards) and not vector


def test_equals_the_reference_and_resumes_after_a_crash(tmp_path, shards, digits):
    cfg = _cfg()
    averaged, losses = _reference(cfg, digits.images)
    kw = {"storage_path": tmp_path / "state", "run_name": "r"}
    with pytest.raises(RuntimeError, match="crash at step 25"):
        train_in_process(cfg, shards, tmp_path / "ckpt", callbacks=[CrashAt(25)], **kw)
    state = load_training_state(tmp_path / "state" / "r" / STATE_FILE)
    assert state["step"] == 20 and not (tmp_path / "ckpt").exists()  # last save; no model yet
    out = train_in_process(cfg, shards, tmp_path / "ckpt", **kw)
    assert out["start_step"] == 20 and out["steps"] == 30 and out["workers"] == 1
    assert out["batch_size"] == 16 and out["images_per_second"] > 0
    assert out["loss_last"] == pytest.approx(np.mean(losses[-3:]), rel=1e-6)  # last 30 // 10 steps
    ckpt = load_checkpoint(out["checkpoint"], expect={"preset": "tiny", "resolution": 8})
    _same_weights(ckpt.unet, averaged)  # the crash changed nothing
    assert ckpt.meta["steps"] == 30 and ckpt.meta["data"] == {"source": str(shards), "n": 64}
    assert not (tmp_path / "state" / "r" / STATE_FILE).exists()  # removed once installed

    # another training's state in that folder is refused, not continued
    with pytest.raises(RuntimeError):
        train_in_process(cfg, shards, tmp_path / "ckpt2", callbacks=[CrashAt(15)], **kw)
    with pytest.raises(UserInputError, match="belongs to another training"):
        train_in_process(_cfg("train.lr=0.01", "train.seed=3"), shards, tmp_path / "ckpt2", **kw)


def test_launcher_rules(shards, digits):
    assert resolve_launcher(_cfg().train) == "process"  # auto, one CPU worker
    assert resolve_launcher(_cfg("train.workers=2").train) == "ray"
    assert resolve_launcher(_cfg("train.use_gpu=true").train) == "ray"
    assert resolve_launcher(_cfg("train.launcher=ray").train) == "ray"
    with pytest.raises(UserInputError, match="train.launcher=process trains one worker"):
        check_train(
            _cfg("train.launcher=process", "train.workers=2").train, init_from_required=False
        )
    # auto: a set above train.in_memory_gb (decoded: 64 x 8 x 8 x 5 B = 20,480 B) goes to Ray
    # Train, which streams it; an explicit process launcher refuses it before training
    assert choose_launcher(_cfg("train.in_memory_gb=0.00002"), shards) == "ray"
    assert choose_launcher(_cfg("train.in_memory_gb=0.00003"), shards) == "process"
    with pytest.raises(UserInputError, match="larger than train.in_memory_gb"):
        train_in_process(_cfg("train.in_memory_gb=0.00002", "train.launcher=process"), shards,
                         shards.parent / "ckpt", storage_path=shards.parent, run_name="x")  # fmt: skip
    assert choose_launcher(_cfg(), digits) == "process"
