"""A run's storage: manifests verified on resume (a damaged output is redone, equal to the
original), damaged run files reported clearly, runs that move and grow, checkpoints that verify
their checksums. One cheap run to ``0:train_set`` (real data, its embeddings, a training set) is
shared; nothing here trains or samples a model through the loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import start_local_ray, tiny_checkpoint

from raycollapse.cli.main import main
from raycollapse.config import load_config, to_dict
from raycollapse.diffusion.checkpoint import load_checkpoint
from raycollapse.errors import UserInputError
from raycollapse.loop import manifest
from raycollapse.loop.rundir import RunDir
from raycollapse.loop.runner import run_loop

TINY = ["data.n=64", "loop.iterations=2", "loop.train_size=16", "loop.pool_multiple=2",
        "loop.metric_features=[pixel]", "knn.k=2", "train.steps=2", "sample.group_size=16"]  # fmt: skip


def cfg_at(storage: Path, *extra: str):
    return load_config(None, [*TINY, f"loop.storage={storage}", *extra])


def _bytes(run: Path) -> dict[str, bytes]:
    """Every non-hidden file of a run (the markers aside: they hold timings)."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "_done" not in p.parts
            and not any(q.startswith(".") for q in p.relative_to(run).parts)}  # fmt: skip


@pytest.fixture(scope="module")
def early_run(tmp_path_factory) -> Path:
    start_local_ray()
    run = tmp_path_factory.mktemp("run") / "a"
    run_loop(cfg_at(run), until="0:train_set", log=lambda m: None)
    return run


def test_manifests_cover_every_output(early_run):
    rd = RunDir(str(early_run))
    for t, stage in [(0, "real"), (0, "train_set")]:
        files = rd.stage_info(t, stage)["manifest"]
        on_disk = {p.relative_to(early_run).as_posix() for out in manifest.stage_outputs(t, stage)
                   for p in ([early_run / out] if (early_run / out).is_file()
                             else (early_run / out).rglob("*")) if p.is_file()}  # fmt: skip
        assert set(files) == on_disk and files
        for rel, entry in files.items():
            import hashlib

            data = (early_run / rel).read_bytes()
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert rd.check_stage(t, stage) is None


def test_moved_run_with_damaged_outputs_is_repaired(early_run, tmp_path):
    """Copied elsewhere (the path is no part of a run), a truncated real shard, a bit flip in an
    embedding shard and a deleted training-set shard are each noticed and redone, byte for byte."""
    moved = tmp_path / "moved"
    shutil.copytree(early_run, moved)
    before = _bytes(moved)
    real = sorted((moved / "real" / "data").glob("*.parquet"))[0]
    real.write_bytes(real.read_bytes()[:100])
    emb = sorted((moved / "real" / "embeddings" / "pixel").glob("*.parquet"))[0]
    b = bytearray(emb.read_bytes())
    b[len(b) // 2] ^= 1
    emb.write_bytes(bytes(b))
    shutil.rmtree(moved / "iter_000" / "train_set")
    said: list[str] = []
    run_loop(cfg_at(moved), until="0:train_set", log=said.append)
    assert any("real: " in s and "it is done again" in s for s in said)
    assert any("train_set: " in s and "is missing" in s for s in said)
    assert _bytes(moved) == before


def test_damaged_run_files_are_named(early_run, tmp_path, capsys):
    broken = tmp_path / "b"
    shutil.copytree(early_run, broken)
    (broken / "config.yaml").write_text("loop: [unclosed\n")
    with pytest.raises(UserInputError, match=r"config.yaml' is damaged"):
        run_loop(cfg_at(broken), until="0:train_set", log=lambda m: None)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    assert main(["run", str(cfg_file), *TINY, f"loop.storage={broken}"]) == 2
    assert "config.yaml' is damaged" in capsys.readouterr().err
    assert main(["--debug", "run", str(cfg_file), *TINY, f"loop.storage={broken}"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_damaged_metrics_table_is_rebuilt(tmp_path):
    rd = RunDir(str(tmp_path / "r"))
    rows = [{"iteration": t, "entropy_train": float(t)} for t in range(2)]
    for t, row in enumerate(rows):
        p = tmp_path / "r" / f"iter_{t:03d}" / "metrics.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(row))
        rd.mark_done(t, "metrics", {"manifest": manifest.build(rd.path, t, "metrics")})
    (tmp_path / "r" / "metrics.json").write_text("[{trunc")
    with pytest.raises(UserInputError, match="metrics.json' is damaged"):
        rd.metrics()
    said: list[str] = []
    assert rd.verify(2, said.append) == rows and any("Rebuilding" in s for s in said)
    (tmp_path / "r" / "iter_001" / "metrics.json").write_text("{}")  # damaged: iteration undone
    assert rd.verify(2, said.append) == rows[:1] and not rd.is_done(1, "metrics")


def test_only_a_larger_iteration_count_extends_a_run(early_run, tmp_path):
    rd = RunDir(str(early_run))
    saved = (early_run / "config.yaml").read_text()
    with pytest.raises(UserInputError, match=r"loop.iterations: 2 \(saved\) -> 1 \(now\)"):
        rd.claim(cfg_at(early_run, "loop.iterations=1"))
    with pytest.raises(UserInputError, match="train.lr"):
        rd.claim(cfg_at(early_run, "loop.iterations=3", "train.lr=0.5"))
    assert (early_run / "config.yaml").read_text() == saved
    elsewhere = RunDir(str(tmp_path / "x"))
    shutil.copytree(early_run, elsewhere.path)
    assert elsewhere.claim(cfg_at(tmp_path / "x")) is False  # moved: not a change
    assert elsewhere.claim(cfg_at(tmp_path / "x", "loop.iterations=3")) is True
    assert elsewhere.saved_config()["loop"]["iterations"] == 3
    assert to_dict(cfg_at(tmp_path / "x", "loop.iterations=3"))["loop"]["iterations"] == 3


def test_checkpoint_checksums(tmp_path):
    ckpt = Path(tiny_checkpoint(tmp_path / "c"))
    load_checkpoint(ckpt)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    b = bytearray(good)
    b[-10] ^= 1  # a flipped bit in a weight: safetensors itself still loads it
    weights.write_bytes(bytes(b))
    with pytest.raises(UserInputError, match="does not match its checksum"):
        load_checkpoint(ckpt)
    weights.write_bytes(good[:-10])
    with pytest.raises(UserInputError, match="truncated"):
        load_checkpoint(ckpt)
    weights.write_bytes(good)
    shutil.rmtree(ckpt / "scheduler")
    with pytest.raises(UserInputError, match="lacks scheduler/scheduler_config.json"):
        load_checkpoint(ckpt)


def test_malicious_training_state_is_refused(tmp_path, capsys):
    """A pickle that would run code: torch's weights_only loader refuses it, as a clear error."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    out = tmp_path / "t"
    args = ["train", "--out", str(out), "train.steps=2", "train.batch_size=4", "data.n=8",
            "train.sample_grid=0", "train.log_every=0", "train.cpu_threads=1"]  # fmt: skip
    out.mkdir()
    from raycollapse.cli.train_cmd import signature
    from raycollapse.io.outputs import write_signature

    write_signature(out, signature(load_config(None, args[3:] + [f"train.out={out}"])))
    (out / "train_state.pt").write_bytes(pickle.dumps(Evil()))
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "cannot read training state" in captured.err and "pwned" not in captured.out


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(early_run, tmp_path):
    """Keys join the schema with the old behaviour as their default: a config.yaml written before
    them resumes, and a value other than the default is still a change."""
    import yaml

    old = RunDir(str(tmp_path / "old"))
    shutil.copytree(early_run, old.path)
    saved = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del saved["sample"]["precision"], saved["train"]["compile"]  # as an older version wrote it
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert old.claim(cfg_at(tmp_path / "old")) is False
    with pytest.raises(UserInputError, match=r"train.compile: False \(saved\) -> True \(now\)"):
        old.claim(cfg_at(tmp_path / "old", "train.compile=true"))
