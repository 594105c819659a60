"""Output safety of the commands that write (``train``, ``generate``, ``embed``): an existing
output is replaced only with ``--overwrite`` or resumed only for the same work, an output equal
to an input is refused, an unwritable output is refused before any work, and a refused command
leaves nothing behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_checkpoint
from PIL import Image

from raycollapse.cli.main import main
from raycollapse.errors import UserInputError
from raycollapse.io.outputs import check_output, fingerprint, output_guard

torch.set_num_threads(1)

FAST = ["train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.sample_grid=0",
        "train.log_every=0", "data.n=8", "train.cpu_threads=1"]  # fmt: skip
GEN = ["--n", "4", "--steps", "2", "sample.group_size=4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")


def _err(capsys) -> str:
    return capsys.readouterr().err


# -- the shared function -------------------------------------------------------------------


def test_check_output_refusals(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.npy").write_bytes(b"0")
    for out in (data, data / "x.npy", data / "sub", tmp_path):  # equal, inside, holding it
        with pytest.raises(UserInputError, match="would destroy the input"):
            check_output(out, inputs=[data], overwrite=True)
    existing = tmp_path / "e.npy"
    existing.write_bytes(b"1")
    with pytest.raises(UserInputError, match="already exists; pass --overwrite"):
        check_output(existing)
    assert check_output(existing, overwrite=True) is False and existing.read_bytes() == b"1"
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="cannot write --out"):
        check_output(blocker / "sub" / "o.npy")
    fresh = tmp_path / "a" / "b" / "o.npy"
    assert check_output(fresh) is False and not (tmp_path / "a").exists()  # probe cleaned up


def test_output_guard_removes_only_what_a_refused_command_made(tmp_path):
    made = tmp_path / "new" / "out"
    with pytest.raises(UserInputError), output_guard(made):
        made.mkdir(parents=True)
        (made / "part.parquet").write_text("x")
        raise UserInputError("bad")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt), output_guard(kept):  # an interrupt keeps a partial state
        kept.mkdir()
        raise KeyboardInterrupt
    assert kept.exists()


def test_fingerprint_sees_content_not_timestamps(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.png").write_bytes(b"abc")
    first = fingerprint(d)
    (d / ".hidden").write_text("ignored")
    assert fingerprint(d) == first
    (d / "a.png").write_bytes(b"abd")
    assert fingerprint(d) != first


# -- through the CLI -----------------------------------------------------------------------


def test_generate_output_safety(ckpt, tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert main(["generate", ckpt, *GEN, "--out", str(out)]) == 0
    first = np.load(out)
    assert main(["generate", ckpt, *GEN, "--seed", "1", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in _err(capsys)
    assert np.array_equal(np.load(out), first)
    assert main(["generate", ckpt, *GEN, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert not np.array_equal(np.load(out), first)
    # the checkpoint itself, and a path under a file: refused before sampling
    assert main(["generate", ckpt, *GEN, "--out", ckpt, "--overwrite"]) == 2
    assert "would destroy the input" in _err(capsys)
    blocker = tmp_path / "f"
    blocker.write_text("x")
    start = time.perf_counter()
    assert main(["generate", ckpt, "--n", "4000", "--out", str(blocker / "o.npy")]) == 2
    assert "cannot write --out" in _err(capsys) and time.perf_counter() - start < 5


def test_generate_parquet_grows_hidden_and_resumes(ckpt, tmp_path, capsys):
    """An interrupted Parquet output is a hidden partial folder (a reader never sees it); the
    same command resumes it, keeping the shards written before."""
    out = tmp_path / "pool"
    partial = tmp_path / ".pool.partial"
    two = [*GEN, "--batch-size", "2", "sample.group_size=2"]  # two shards
    assert main(["generate", ckpt, *two, "--out", str(out)]) == 0
    capsys.readouterr()
    ref = pq.read_table(out).sort_by("id")
    first = out / "part-00000000.parquet"
    mtime = first.stat().st_mtime_ns
    out.rename(partial)  # as an interrupted run leaves it: the first shard only
    (partial / "part-00000002.parquet").unlink()
    assert main(["generate", ckpt, *two, "--out", str(out)]) == 0
    assert not partial.exists() and first.stat().st_mtime_ns == mtime  # kept, not redone
    assert pq.read_table(out).sort_by("id").equals(ref)
    # the finished output of the same work is resumed (nothing to do); other work is refused
    assert main(["generate", ckpt, *two, "--out", str(out)]) == 0
    assert main(["generate", ckpt, *two, "--seed", "3", "--out", str(out)]) == 2
    assert "holds other work" in _err(capsys)


def test_train_resumes_only_the_same_work(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    weights = (out / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for change in ("train.lr=0.01", "data.seed=1", "model.seed=1"):
        assert main(["train", "--out", str(out), *FAST, change]) == 2
        assert "holds other work" in _err(capsys)
    assert (
        out / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes() == weights
    assert main(["train", "--out", str(out), *FAST, "train.log_every=1"]) == 0  # same work
    assert main(["train", "--out", str(out), *FAST, "train.lr=0.01", "--overwrite"]) == 0
    capsys.readouterr()
    saved = (out / "config.yaml").read_text()
    assert "lr: 0.01" in saved
    # a refused train leaves no folder behind
    bad = tmp_path / "bad"
    assert main(["train", "--out", str(bad), *FAST, "model.preset=unet32"]) == 2
    assert not bad.exists()


def _image_folder(folder: Path, shift: int) -> Path:
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i + shift, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_embed_refuses_an_output_of_other_images(tmp_path, ray_local, capsys):
    a, b = _image_folder(tmp_path / "a", 0), _image_folder(tmp_path / "b", 1)
    out = tmp_path / "emb"
    assert main(["embed", str(a), "--features", "pixel", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 0
    assert main(["embed", str(a), "--features", "pixel", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 1  # the same work: resumed
    assert main(["embed", str(b), "--features", "pixel", "--out", str(out)]) == 2
    assert "holds other work" in _err(capsys)
    assert main(["embed", str(a), "--features", "pixel", "--out", str(a / "e")]) == 2
    assert "would destroy the input" in _err(capsys)


def test_image_arrays_with_nan_or_complex_values_are_refused():
    from raycollapse.io.images import decode_value

    for bad, fragment in [(np.full((2, 2), np.nan), "NaN"), (np.ones((2, 2)) + 1j, "real numbers")]:
        with pytest.raises(UserInputError, match=fragment):
            decode_value(bad, name="row 3")
    assert decode_value(np.full((2, 2), 0.5), name="ok").ravel().tolist() == [128] * 4
