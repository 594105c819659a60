"""Bad configs fail before any work, naming the key and the fix, and write nothing.

Every check that needs no data is in ``raycollapse.config.checks``; each command runs the checks of
the sections it reads before it reads an input, builds a model or starts Ray. The CLI cases below
give every command an input that does not exist: a check that ran after reading it would report
the missing input instead of the key.
"""

from pathlib import Path

import pytest

from raycollapse.cli.main import main
from raycollapse.config import load_config
from raycollapse.config.checks import check_command, feature_spaces, pool_size
from raycollapse.errors import UserInputError
from raycollapse.loop.runner import run_loop

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))
SMOKE = str(ROOT / "configs" / "smoke.yaml")

# (overrides, the key the message must name) for `raycollapse run`
RUN_CASES = [
    (["data.channels=2"], "data.channels"),
    (["data.resolution=0"], "data.resolution"),
    (["data.n=0"], "data.n"),
    (["data.source=folder"], "data.path"),
    (["model.preset=unet32"], "data.resolution"),
    (["model.class_conditional=true", "model.num_classes=0"], "model.num_classes"),
    (["diffusion.num_train_timesteps=1"], "diffusion.num_train_timesteps"),
    (["diffusion.beta_start=0.5"], "diffusion.beta_start"),
    (["train.steps=0"], "train.steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.workers=0"], "train.workers"),
    (["train.workers=4", "train.batch_size=2"], "train.batch_size"),
    (["train.lr=0"], "train.lr"),
    (["train.ema_decay=1.0"], "train.ema_decay"),
    (["train.cpu_threads=0"], "train.cpu_threads"),
    (["train.mixed_precision=bf16"], "train.mixed_precision"),
    (["sample.steps=0"], "sample.steps"),
    (["sample.steps=1001"], "sample.steps"),
    (["sample.eta=-0.1"], "sample.eta"),
    (["sample.group_size=0"], "sample.group_size"),
    (["sample.precision=bf16"], "sample.precision=bf16 needs CUDA"),
    (["sample.batch_size=0"], "sample.batch_size"),
    (["sample.guidance=2"], "sample.guidance"),
    (["sample.label=1"], "sample.label"),
    (["model.class_conditional=true", "sample.label=10"], "sample.label"),
    (["knn.k=0"], "knn.k"),
    (["knn.eps=0"], "knn.eps"),
    (["knn.batch_size=0"], "knn.batch_size"),
    (["knn.shards=0"], "knn.shards"),
    (["knn.bootstrap=-1"], "knn.bootstrap"),
    (["select.method=threshold", "select.decay=1.0"], "select.decay"),
    (["select.method=threshold", "select.tau0=-1"], "select.tau0"),
    (["resources.generate_actors=-1"], "resources.generate_actors"),
    (["resources.embed_gpus_per_actor=-1"], "resources.embed_gpus_per_actor"),
    (["resources.cpus_per_actor=0"], "resources.cpus_per_actor"),
    (["loop.iterations=0"], "loop.iterations"),
    (["loop.train_size=1"], "loop.train_size"),
    (["loop.pool_multiple=0.5"], "loop.pool_multiple"),
    (["loop.paradigm=fresh", "loop.fresh_fraction=1.5"], "loop.fresh_fraction"),
    (["loop.fresh_fraction=0.5"], "loop.paradigm=fresh"),
    (["loop.metric_features=[]"], "loop.metric_features"),
    (["loop.metric_features=[pixel,clip]"], "ViT-B-32"),
    (["knn.k=32"], "knn.k"),
]


@pytest.mark.parametrize("overrides, key", RUN_CASES, ids=lambda v: str(v))
def test_run_refuses_before_any_work(tmp_path, capsys, overrides, key):
    run = tmp_path / "run"
    cfg = load_config(SMOKE, [f"loop.storage={run}", *overrides])
    with pytest.raises(UserInputError, match=key):
        check_command(cfg, "run")
    code = main(["run", SMOKE, *overrides, f"loop.storage={run}"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err
    assert not run.exists()


def test_shipped_settings_pass_and_loop_needs_no_init_from(tmp_path):
    for overrides in (
        [],
        ["train.init=finetune"],
        ["loop.paradigm=fresh", "loop.fresh_fraction=1"],
    ):
        check_command(load_config(SMOKE, overrides), "run")
    # DDPM runs every step: sample.steps does not apply to it
    check_command(load_config(SMOKE, ["sample.sampler=ddpm", "sample.steps=5000"]), "run")
    with pytest.raises(UserInputError, match="train.init_from"):
        check_command(load_config(SMOKE, ["train.init=finetune"]), "train")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["entropy", "{missing}", "--k", "0"], "knn.k"),
        (["entropy", "{missing}", "--bootstrap", "-1"], "knn.bootstrap"),
        (["entropy", "{missing}", "--shards", "0"], "knn.shards"),
        (["entropy", "{missing}", "knn.batch_size=0"], "knn.batch_size"),
        (["select", "{missing}", "--out", "{out}.npy", "--budget", "0"], "budget must be >= 1"),
        (["select", "{missing}", "--out", "{out}.npy"], "no budget given"),
        (["select", "{missing}", "--out", "{out}.npy", "--budget", "2", "select.method=none"],
         "select.method=none"),
        (["select", "{missing}", "--out", "{out}.npy", "--budget", "2", "--method", "threshold",
          "--decay", "0"], "select.decay"),
        (["select", "{missing}", "--out", "{out}.npy", "--budget", "2", "--method", "threshold",
          "--tau0", "0"], "select.tau0"),
        (["select", "{missing}", "--out", "{out}.npy", "--budget", "2", "knn.k=0"], "knn.k"),
        (["train", "--out", "{out}", "--steps", "0"], "train.steps"),
        (["train", "--out", "{out}", "train.lr=-1"], "train.lr"),
        (["train", "--out", "{out}", "train.init=finetune"], "train.init_from"),
        (["train", "--out", "{out}", "sample.steps=2000"], "sample.steps"),
        (["train", "--out", "{out}", "data.source=parquet"], "data.path"),
        (["train", "--out", "{out}", "model.preset=unet64"], "data.resolution"),
        (["generate", "{missing}", "--n", "2"], "--out is required"),
        (["generate", "{missing}", "--out", "{out}.npy", "--n", "0"], "sample.n"),
        (["generate", "{missing}", "--out", "{out}.npy", "--batch-size", "0"], "sample.batch_size"),
        (["generate", "{missing}", "--out", "{out}.npy", "--steps", "0"], "sample.steps"),
        (["generate", "{missing}", "--out", "{out}.npy", "sample.precision=bf16"],
         "sample.precision=bf16 needs CUDA"),
        (["train", "--out", "{out}", "sample.precision=bf16"], "sample.precision=bf16"),
        (["generate", "{missing}", "--out", "{out}.npy", "--eta", "-1"], "sample.eta"),
        (["generate", "{missing}", "--out", "{out}", "--actors", "-1"], "resources.generate_actors"),
        (["embed", "{missing}", "--out", "{out}", "--batch-size", "0"], "features.batch_size"),
        (["embed", "{missing}", "--out", "{out}", "--actors", "-1"], "resources.embed_actors"),
        (["embed", "{missing}", "--out", "{out}", "--features", "clip"], "ViT-B-32"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)  # fmt: skip
def test_commands_refuse_before_any_work(tmp_path, capsys, argv, key):
    out = tmp_path / "out"
    argv = [a.format(missing=tmp_path / "missing", out=out) for a in argv]
    if argv[0] == "train":  # small enough that a missing check costs seconds, not minutes
        argv += ["data.n=16", "train.steps=2", "train.batch_size=4", "train.sample_grid=2"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err, err
    assert "does not exist" not in err  # refused before the input was looked at
    assert list(tmp_path.iterdir()) == []


def test_train_grid_settings_apply_only_to_a_grid():
    cfg = load_config(None, ["train.sample_grid=0", "sample.steps=5000"])
    check_command(cfg, "train")


def test_pool_and_feature_spaces():
    cfg = load_config(None, ["loop.train_size=10", "loop.pool_multiple=1.5"])
    assert pool_size(cfg) == 15
    cfg = load_config(None, ["loop.metric_features=[pixel,inception]", "features.name=dinov2"])
    assert feature_spaces(cfg) == ["pixel", "inception", "dinov2"]
    cfg = load_config(None, ["loop.metric_features=[pixel]", "features.name=dinov2",
                             "select.method=random"])  # fmt: skip
    assert feature_spaces(cfg) == ["pixel"]  # random selection embeds into no extra space


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.n=10", "loop.train_size=16"], "loop.train_size"),
        (
            [
                "loop.paradigm=fresh",
                "loop.fresh_fraction=0.5",
                "loop.iterations=40",
                "data.n=100",
                "loop.train_size=16",
            ],
            "fresh",
        ),
    ],
)
def test_bad_loop_config_for_its_data(tmp_path, overrides, fragment):
    run = tmp_path / "run"
    cfg = load_config(SMOKE, [f"loop.storage={run}", *overrides])
    with pytest.raises(UserInputError, match=fragment):
        run_loop(cfg, log=lambda m: None)
    assert not run.exists()


def test_run_loop_checks_its_config_itself(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(SMOKE, [f"loop.storage={run}", "knn.k=32"])
    with pytest.raises(UserInputError, match="knn.k=32 must be < loop.train_size=32"):
        run_loop(cfg, log=lambda m: None)
    assert not run.exists()


def test_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"loop.storage={blocker}/run", "data.n=50", "loop.train_size=8"])
    with pytest.raises(UserInputError, match="cannot write to loop.storage"):
        run_loop(cfg, log=lambda m: None)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["loop.paradigm=swap"], "expected one of"),
        (["select.method=best"], "expected one of"),
        (["loop.metric_features=[pixel,sift]"], "loop.metric_features[1]"),
    ],
)
def test_unknown_names_via_cli(tmp_path, capsys, overrides, fragment):
    code = main(["run", str(CONFIGS[0]), *overrides, f"loop.storage={tmp_path / 'r'}"])
    assert code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_match_the_schema(path):
    load_config(path)
