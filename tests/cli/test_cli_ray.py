"""`raycollapse generate --actors` and `raycollapse train train.workers=2` run on Ray."""

import json

import numpy as np
import pytest
from helpers import tiny_checkpoint

from raycollapse.cli.main import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", num_train_timesteps=50)


def test_generate_on_ray_equals_in_process(ckpt, tmp_path, ray_local, capsys):
    common = ["--n", "40", "--steps", "3", "sample.group_size=16", "--batch-size", "16"]
    assert main(["generate", ckpt, "--out", str(tmp_path / "a.npy"), *common]) == 0
    assert main(["generate", ckpt, "--out", str(tmp_path / "b.npy"), "--actors", "2", *common]) == 0
    capsys.readouterr()
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (40, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_generate_asks_for_gpus_the_cluster_lacks(ckpt, tmp_path, ray_local, capsys):
    code = main(
        [
            "generate",
            ckpt,
            "--n",
            "8",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "p"),
            "--gpus-per-actor",
            "1",
        ]  # fmt: skip
    )
    assert code == 2 and "GPU" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


@pytest.mark.slow
def test_train_with_two_workers(tmp_path, ray_local, capsys):
    out = tmp_path / "train"
    code = main(["train", "data.n=64", "train.steps=8", "train.batch_size=16", "train.warmup_steps=2",
                 "train.workers=2", "train.checkpoint_every=4", "train.cpu_threads=1", f"train.out={out}"])  # fmt: skip
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 8 and res["workers"] == 2 and np.isfinite(res["loss_last"])
    assert (out / "checkpoint" / "raycollapse.json").exists()
