"""configs/paper/*.yaml against the authors' released code, ``raycollapse config``, and
``raycollapse run --dry-run`` (checks everything, prints config and plan, writes nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from raycollapse.cli import config_cmd, run_cmd
from raycollapse.config import load_config, to_dict
from raycollapse.errors import UserInputError

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"

# The released code (github.com/shilianghe007/Model_Collapse), written out by hand:
# model_collapse.sh's flags and train_unconditional.py's parse_args defaults and main.
AUTHORS = {
    "data.resolution": 32,  # --resolution=32
    "data.channels": 3,
    "data.n": 32768,  # --data_size=32768
    "loop.train_size": 32768,  # --data_size=32768
    "model.preset": "unet48",  # --model_size="UNet48"
    "diffusion.num_train_timesteps": 1000,  # --ddpm_num_steps=1000
    "diffusion.beta_schedule": "linear",  # --ddpm_beta_schedule linear
    "diffusion.beta_start": 1e-4,  # DDPMScheduler's default
    "diffusion.beta_end": 0.02,  # DDPMScheduler's default
    "sample.sampler": "ddpm",  # DDPMPipeline, --ddpm_num_inference_steps=1000
    "train.steps": 501 * (32768 // 128),  # --num_epochs=501, 256 batches per epoch
    "train.batch_size": 128,  # --train_batch_size=128
    "train.lr": 1e-4,  # --learning_rate 1e-4
    "train.warmup_steps": 500,  # --lr_warmup_steps 500 (cosine)
    "train.adam_beta1": 0.95,  # --adam_beta1 0.95
    "train.adam_beta2": 0.999,  # --adam_beta2 0.999
    "train.weight_decay": 1e-6,  # --adam_weight_decay 1e-6
    "train.grad_clip": 1.0,  # accelerator.clip_grad_norm_(..., 1.0)
    "train.mixed_precision": "fp16",  # --mixed_precision="fp16"
    "train.sample_from": "raw",  # no --use_ema
    "train.init": "scratch",  # a new UNet2DModel every iteration
    "knn.k": 1,  # compute_entropy_from_npy(k=1)
    "features.name": "dinov2",  # use_feature=True: extract_features (DINOv2 CLS)
    "features.dinov2_preprocess": "hf",  # AutoImageProcessor facebook/dinov2-small
    "loop.iterations": 29,  # --num_iters 30: range(1, 30)
    "metrics.paper_generalization": True,
    "metrics.paper_generalization_generated": 1000,  # gen_idx + 1 >= 1000
    "metrics.paper_generalization_train": 1280,  # batches of 256 until i > 1000
    "metrics.fid_torchvision": True,
    "metrics.fid_torchvision_generated": 32768,  # NpyDataset: images[:32768]
}
# --syn_type of each run: (paradigm, selection, m = sample_dataset_size / data_size, tau0, decay,
# accumulate baseline)
RUNS = {
    "replace_baseline_m1": ("replace", "none", 1, None, None, None),  # last
    "replace_greedy_m2": ("replace", "greedy", 2, None, None, None),  # last_greedyfeature
    "replace_greedy_m5": ("replace", "greedy", 5, None, None, None),  # last_greedyfeature_5n
    "replace_threshold_m2": ("replace", "threshold", 2, 60.0, 0.95, None),  # last_filteredfeature
    "accumulate_baseline": ("accumulate", "none", 1, None, None, "per_generation"),  # accumulated
    "accumulate_greedy_m1": ("accumulate", "greedy", 1, None, None, None),
    "accumulate_greedy_m2": ("accumulate", "greedy", 2, None, None, None),  # ..._2n
    "accumulate_greedy_m5": ("accumulate", "greedy", 5, None, None, None),  # ..._5n
    "accumulate_threshold": ("accumulate", "threshold", 1, 60.0, 0.80, None),  # filteredfeature
}

# Toy size on 2 CPU cores: digits, the tiny UNet, 8 diffusion steps, random feature weights.
TOY = [
    "data.source=digits", "data.n=48", "data.resolution=8", "data.channels=1", "model.preset=tiny",
    "diffusion.num_train_timesteps=8", "train.steps=4", "train.batch_size=16", "train.warmup_steps=1",
    "train.use_gpu=false", "train.mixed_precision=auto", "train.checkpoint_every=0",
    "train.cpu_threads=1", "train.log_every=4", "sample.batch_size=64", "sample.group_size=16",
    "features.pretrained=none", "features.dinov2_preprocess=timm", "features.dinov2_image_size=14",
    "loop.iterations=2", "loop.train_size=16", "metrics.use_gpu=false",
    "metrics.torchvision_inception=none", "metrics.paper_generalization_generated=4",
    "metrics.paper_generalization_train=4", "metrics.fid_torchvision_generated=8",
    "resources.generate_gpus_per_actor=0", "resources.embed_gpus_per_actor=0",
    # in the driver's process: toy pools take less time than an actor's start-up
    "resources.generate_actors=0", "resources.embed_actors=0",
]  # fmt: skip


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    run_cmd.add_parser(sub)
    config_cmd.add_parser(sub)
    return parser.parse_args(argv)


def test_one_preset_per_run_of_the_authors_script():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_preset_equals_the_released_code(name):
    text = (PAPER / f"{name}.yaml").read_text()
    assert text.startswith("# The paper's run") and "--syn_type=" in text  # names run and line
    c = to_dict(load_config(PAPER / f"{name}.yaml"))
    for key, value in AUTHORS.items():
        assert _get(c, key) == pytest.approx(value), key
    paradigm, method, m, tau0, decay, baseline = RUNS[name]
    assert (c["loop"]["paradigm"], c["select"]["method"], c["loop"]["pool_multiple"]) == (
        paradigm, method, m,
    )  # fmt: skip
    if method == "threshold":
        assert (c["select"]["tau0"], c["select"]["decay"]) == pytest.approx((tau0, decay))
    if method == "none":
        assert c["loop"]["accumulate_baseline"] == (baseline or "uniform")
    assert c["loop"]["storage"] == f"runs/paper/{name}"


def test_config_command_prints_every_key(capsys):
    args = _parse(["config", str(PAPER / "replace_greedy_m2.yaml"), "knn.k=4"])
    assert args.func(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    full = to_dict(load_config(None, []))

    def keys(d, prefix=""):
        return {
            prefix + k for k, v in d.items() for k in ([k] if not isinstance(v, dict) else [])
        } | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}

    assert keys(printed) == keys(full)  # every key, defaults filled in
    assert printed["knn"]["k"] == 4 and printed["train"]["adam_beta1"] == 0.95
    assert printed["sample"]["group_size"] == full["sample"]["group_size"]  # a default
    with pytest.raises(UserInputError, match="knn.kk"):
        args = _parse(["config", str(PAPER / "replace_greedy_m2.yaml"), "knn.kk=4"])
        args.func(args)


def test_dry_run_of_every_preset_writes_nothing(tmp_path, capsys):
    for name in sorted(RUNS):
        store = tmp_path / name / "run"
        args = _parse(
            ["run", str(PAPER / f"{name}.yaml"), *TOY, f"loop.storage={store}", "--dry-run"]
        )
        assert args.func(args) == 0
        out = capsys.readouterr().out
        config_part, plan_part = out.split("# plan\n")
        plan = yaml.safe_load(plan_part)
        assert yaml.safe_load(config_part.split("# resolved config\n")[1])["loop"][
            "storage"
        ] == str(store)
        m, b = RUNS[name][2], 16
        assert (
            plan["iterations"] == 2 and [it["pool"] for it in plan["per_iteration"]] == [m * b] * 2
        )
        cands = m * b if RUNS[name][0] == "replace" else b + m * b
        assert plan["per_iteration"][1]["candidates"] == cands
        assert plan["resources"]["train"]["workers"] == 1 and plan["real_images"] == 48
        assert not (tmp_path / name).exists()  # nothing written, not even the folder


def test_dry_run_refuses_what_the_run_would(tmp_path):
    base = [str(PAPER / "replace_threshold_m2.yaml"), *TOY, f"loop.storage={tmp_path / 'r'}"]
    cases = {
        ("train.workers=64", "train.batch_size=128"): "train: 64 workers",
        ("resources.embed_gpus_per_actor=1",): "embed: each worker asks for 1 GPU",
        ("data.source=cifar10", "data.path=/nowhere/cifar-10-batches-py"): "nowhere",
        ("loop.train_size=100",): "loop.train_size",  # B > the 48 real images
        ("metrics.torchvision_inception=/nowhere/inception.pth",): "does not exist",
    }
    for overrides, message in cases.items():
        args = _parse(["run", *base, *overrides, "--dry-run"])
        with pytest.raises(UserInputError, match=message):
            args.func(args)
    assert not (tmp_path / "r").exists()


# Two iterations of three presets (~25 s of Ray overhead per iteration here). Together they run
# every code path of the nine: replace and accumulate, selection none (per-generation shares),
# greedy and threshold (tau0 60), m = 1, 2 and 5; the other six only recombine these values
# (checked below), and all nine pass the dry run above.
RUN = {
    "replace_threshold_m2": ["metrics.fid_torchvision_generated=4"],
    "accumulate_baseline": ["metrics.paper_generalization=false", "metrics.fid_torchvision=false"],
    "accumulate_greedy_m5": ["metrics.paper_generalization=false", "metrics.fid_torchvision=false"],
}
# one embedding job per pool (pixel adds a second one) and 20 real images for fid_torchvision
RUN_TOY = ["data.n=20", "loop.metric_features=[dinov2]"]
VARIED = ("loop.paradigm", "select.method", "select.tau0", "select.decay", "loop.pool_multiple",
          "loop.accumulate_baseline", "loop.storage")  # fmt: skip


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.slow
def test_presets_run_two_iterations_at_toy_size(ray_local, tmp_path):
    from raycollapse.loop.rundir import RunDir
    from raycollapse.loop.runner import run_loop

    flat = {n: _flat(to_dict(load_config(PAPER / f"{n}.yaml"))) for n in RUNS}
    ran = [flat[n] for n in RUN]
    for name in RUNS:  # every preset differs from a run one in the varied keys only
        assert any({k for k in flat[name] if flat[name][k] != r[k]} <= set(VARIED) for r in ran)
    for key in ("loop.paradigm", "select.method", "loop.pool_multiple"):
        assert {flat[n][key] for n in RUNS} == {r[key] for r in ran}, key
    for name, extra in RUN.items():
        store = tmp_path / name
        cfg = load_config(PAPER / f"{name}.yaml", [*TOY, *RUN_TOY, f"loop.storage={store}", *extra])
        run_loop(cfg, log=lambda m: None)
        rows = RunDir(str(store)).metrics()
        assert [r["iteration"] for r in rows] == [0, 1]
        assert all(r["entropy_train"] is not None and r["train_size"] == 16 for r in rows)
        if name == "accumulate_baseline":  # 16 // 2 + 1 = 9 real, the newest origin the other 7
            assert rows[1]["share_real"] == 9 / 16 and rows[1]["share_gen_0"] == 7 / 16
        if name == "replace_threshold_m2":
            assert all(
                r["fid_torchvision"] > 0 and r["generalization_score_paper"] > 0 for r in rows
            )
