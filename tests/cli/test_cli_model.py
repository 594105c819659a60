"""``raycollapse train`` and ``raycollapse generate`` end to end (tiny model, a few steps)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycollapse.cli.main import main
from raycollapse.config import load_config
from raycollapse.data.sources import load_records
from raycollapse.diffusion.checkpoint import load_checkpoint
from raycollapse.diffusion.trainer import train_loop

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe: up to 40x slower

FAST = ["train.steps=4", "train.batch_size=8", "train.warmup_steps=1", "train.sample_grid=4",
        "train.log_every=2", "data.n=32", "sample.steps=3", "sample.group_size=4", "train.cpu_threads=1"]  # fmt: skip


def _json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An unconditional and a class-conditional checkpoint, trained for 4 steps."""
    root = tmp_path_factory.mktemp("train")
    paths = {}
    for name, extra in [("uncond", []), ("cond", ["model.class_conditional=true"])]:
        assert main(["train", "--out", str(root / name), *FAST, *extra]) == 0
        paths[name] = root / name
    return paths


def test_train_writes_checkpoint_config_and_json(trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "t"), *FAST]) == 0
    report = _json(capsys)
    for key in ("steps", "loss_first", "loss_last", "images_per_second", "checkpoint", "seconds"):
        assert key in report
    assert report["steps"] == 4 and report["images"] == 32
    assert (tmp_path / "t" / "checkpoint" / "raycollapse.json").is_file()
    assert (tmp_path / "t" / "samples.png").is_file()
    assert "steps: 4" in (tmp_path / "t" / "config.yaml").read_text()
    assert not (tmp_path / "t" / "train_state.pt").exists()


def test_generate_formats_and_batch_size_invariance(trained, tmp_path, capsys):
    ckpt = str(trained["uncond"] / "checkpoint")
    common = [ckpt, "sample.group_size=4", "--n", "9", "--steps", "3", "--seed", "5"]
    assert main(["generate", *common, "--out", str(tmp_path / "a.npy"), "--batch-size", "2"]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "b.npy"), "--batch-size", "7"]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (9, 8, 8, 1) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert main(["generate", *common, "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["generate", *common, "--out", str(tmp_path / "pool"), "--batch-size", "4"]) == 0
    report = _json(capsys)
    assert report["format"] == "parquet" and report["steps"] == 3
    table = pq.read_table(tmp_path / "pool")
    assert (
        table.column("id").to_pylist() == list(range(9)) and table.column("label").null_count == 9
    )
    # the pool folder is never overwritten
    assert main(["generate", *common, "--out", str(tmp_path / "pool")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generate_guided_with_labels(trained, tmp_path):
    """Labels are honoured (same label: same images, another label: others), and guidance 0 is
    the unconditional model, so the label no longer matters."""
    ckpt = str(trained["cond"] / "checkpoint")

    def generate(name, guidance, label):
        out = tmp_path / f"{name}.npy"
        args = [ckpt, "sample.group_size=4", "--n", "4", "--steps", "2", "--seed", "1"]
        cmd = ["generate", *args, "--out", str(out), "--guidance", guidance, "--label", label]
        assert main(cmd) == 0
        return np.load(out)

    g7, g7_again, g3 = generate("a", "2", "7"), generate("b", "2", "7"), generate("c", "2", "3")
    assert g7.shape == (4, 8, 8, 1)
    assert np.array_equal(g7, g7_again) and not np.array_equal(g7, g3)
    z7, z3 = generate("d", "0", "7"), generate("e", "0", "3")
    assert np.array_equal(z7, z3) and not np.array_equal(z7, g7)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--guidance", "1.5"], "needs a class-conditional model"),
        (["--label", "3"], "needs a class-conditional model"),
        (
            ["--steps", "5000"],
            "between 1 and 1000 for DDIM, got 5000; set sample.steps (generate: --steps) to at most 1000",
        ),
    ],
)
def test_generate_refusals(trained, tmp_path, capsys, args, fragment):
    ckpt = str(trained["uncond"] / "checkpoint")
    assert main(["generate", ckpt, "--n", "2", "--out", str(tmp_path / "x.npy"), *args]) == 2
    assert fragment in capsys.readouterr().err


def test_generate_label_out_of_range(trained, tmp_path, capsys):
    ckpt = str(trained["cond"] / "checkpoint")
    assert (
        main(["generate", ckpt, "--n", "2", "--out", str(tmp_path / "x.npy"), "--label", "10"]) == 2
    )
    assert "out of range" in capsys.readouterr().err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert (
        main(["generate", str(tmp_path / "none"), "--n", "2", "--out", str(tmp_path / "x.npy")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_train_refusals(trained, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    ckpt = str(trained["uncond"] / "checkpoint")
    # fine-tuning from a checkpoint that does not match the requested data
    assert (
        main(
            [
                "train",
                *out,
                *FAST,
                "train.init=finetune",
                f"train.init_from={ckpt}",
                "data.resolution=16",
            ]
        )
        == 2
    )
    assert "resolution is 8 (requested 16)" in capsys.readouterr().err
    # labels out of range for a class-conditional model
    assert main(["train", *out, *FAST, "model.class_conditional=true", "model.num_classes=5"]) == 2
    assert "labels go up to 9" in capsys.readouterr().err
    # a class-conditional model on unlabelled data; a missing path; a preset that cannot take 8x8
    assert (
        main(["train", *out, *FAST, "data.source=folder", f"data.path={tmp_path / 'nowhere'}"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *out, *FAST, "model.preset=unet32"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(imgs / f"{i}.png")
    cond_folder = [f"data.path={imgs}", "data.source=folder", "model.class_conditional=true"]
    assert main(["train", *out, *FAST, *cond_folder, "data.n=null"]) == 2
    assert "have no label" in capsys.readouterr().err
    assert main(["train", *out, *FAST, "sample.guidance=2"]) == 2  # refused before training
    assert "needs a class-conditional model" in capsys.readouterr().err
    assert main(["train", *out, *FAST, "train.init=finetune"]) == 2
    assert "needs train.init_from" in capsys.readouterr().err
    diff = ["diffusion.num_train_timesteps=500", "train.init=finetune", f"train.init_from={ckpt}"]
    assert main(["train", *out, *FAST, *diff]) == 2
    assert "trained with 1000 diffusion steps" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint").exists()


def _params(path):
    return list(load_checkpoint(path).unet.parameters())


def _dist(a, b):
    return sum(((x - y) ** 2).sum().item() for x, y in zip(a, b, strict=True))


def test_finetune_starts_from_the_checkpoint(tmp_path, capsys):
    """The fine-tuned model is the in-process loop started from the base weights, bit for bit,
    and stays near them: closer to the base than the same steps from scratch."""
    base = tmp_path / "base"  # initial weights of seed 1: not the scratch model's (seed 0)
    assert main(["train", "--out", str(base), *FAST, "model.seed=1", "train.sample_grid=0"]) == 0
    ft_args = ["train.init=finetune", f"train.init_from={base / 'checkpoint'}"]
    assert main(["train", "--out", str(tmp_path / "ft"), *FAST, *ft_args]) == 0
    assert _json(capsys)["steps"] == 4
    assert main(["train", "--out", str(tmp_path / "scratch"), *FAST, "train.sample_grid=0"]) == 0

    cfg = load_config(overrides=FAST)
    t, start = cfg.train, load_checkpoint(base / "checkpoint")
    ema, _ = train_loop(
        start.unet, load_records(cfg.data).images, None, noise_scheduler=start.scheduler,
        steps=t.steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps, ema_decay=t.ema_decay, grad_clip=t.grad_clip, seed=t.seed,
    )  # fmt: skip
    ema.copy_to(start.unet)
    ft, base_w = _params(tmp_path / "ft" / "checkpoint"), _params(base / "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(ft, start.unet.parameters(), strict=True))
    scratch = _params(tmp_path / "scratch" / "checkpoint")
    assert 0 < _dist(ft, base_w) < _dist(scratch, base_w) / 10


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="needs a machine without CUDA: checks that --gpu / train.use_gpu are refused there",
)
def test_gpu_without_cuda_is_refused(trained, tmp_path, capsys):
    ckpt = str(trained["uncond"] / "checkpoint")
    assert main(["generate", ckpt, "--n", "2", "--out", str(tmp_path / "x.npy"), "--gpu"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), *FAST, "train.use_gpu=true"]) == 2
    # train.use_gpu runs on Ray Train, which refuses a GPU the cluster does not have.
    err = capsys.readouterr().err
    assert "asks for 1 GPU" in err and "Traceback" not in err
