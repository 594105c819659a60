"""One test per row of docs/bad-input.md (the rows with an id): the command exits with the
documented status and message, prints no traceback, and leaves no output behind. Cheap: every
case fails before Ray, a model or any sampling."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_checkpoint
from PIL import Image

from raycollapse.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    x = np.random.default_rng(0).random((20, 3)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "empty.npy", np.zeros((0, 3), np.float32))
    np.save(d / "str.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "nan.npy", np.full((10, 3), np.nan, np.float32))
    pq.write_table(pa.table({"foo": [1, 2, 3]}), d / "nocol.parquet")
    (d / "shards").mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"embedding": x.tolist()}), d / "shards" / f"{name}.parquet")
    b = (d / "shards" / "b.parquet").read_bytes()
    (d / "shards" / "b.parquet").write_bytes(b[: len(b) // 2])
    (d / "bad.yaml").write_text("train: [unclosed\n")
    (d / "list.yaml").write_text("- 1\n")
    (d / "empty.yaml").write_text("{}\n")
    (d / "noimages").mkdir()
    (d / "corrupt").mkdir()
    (d / "corrupt" / "a.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "corrupt" / "b.png")
    ckpt = Path(tiny_checkpoint(d / "ckpt"))
    flipped = d / "flipped"
    import shutil

    shutil.copytree(ckpt, flipped)
    w = flipped / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-10] ^= 1
    w.write_bytes(bytes(raw))
    (d / "afile").write_text("x")
    _clip_weights(d, ckpt)
    return d


def _clip_weights(d: Path, ckpt: Path) -> None:
    """Wrong CLIP weights files, small (real CLIP weights cannot be downloaded here)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    (d / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / "imgs" / f"{i}.png")
    # ViT-B-32's own names with wrong (tiny) shapes; truncated: the same file cut in half.
    names = open_clip.create_model("ViT-B-32", pretrained=None, device="meta").state_dict()
    save_file({k: torch.zeros(2) for k in names}, str(d / "shapes.safetensors"))
    raw = (d / "shapes.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "text.safetensors").write_text("these are not weights\n" * 20)
    (d / "junk.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    # Another architecture's randomly initialised weights: the tiny UNet of the checkpoint.
    unet = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    (d / "unet.safetensors").write_bytes(unet.read_bytes())


@pytest.fixture(autouse=True)
def _no_weight_caches(tmp_path_factory, monkeypatch):
    """Empty weight caches, as on a machine without internet (WeightCaches.default)."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HOME", str(home))


TRAIN = ["train.steps=1", "train.batch_size=2", "data.n=4", "train.sample_grid=0"]
GEN = ["--n", "2", "--steps", "2", "sample.group_size=2"]
CLIP = "embed {d}/imgs --features clip --out {o} --pretrained "

# id, argv ({d}: the inputs folder, {o}: a fresh output path), exit status, message fragment
ROWS = [
    ("config-missing", "entropy {d}/x.npy --config {d}/nofile.yaml", 2, "does not exist"),
    ("config-yaml", "entropy {d}/x.npy --config {d}/bad.yaml", 2, "is not valid YAML"),
    ("config-list", "entropy {d}/x.npy --config {d}/list.yaml", 2, "must hold a mapping"),
    ("key-unknown", "entropy {d}/x.npy nosuch.key=1", 2, "unknown config key 'nosuch'"),
    ("key-noeq", "entropy {d}/x.npy knn.k", 2, "must look like key=value"),
    ("key-type", "entropy {d}/x.npy knn.k=abc", 2, "bad config value for key 'knn.k'"),
    ("key-range", "entropy {d}/x.npy knn.k=0", 2, "knn.k must be >= 1"),
    ("key-name", "select {d}/x.npy --budget 2 --out {o}.npy select.method=best", 2, "select.method"),
    ("flag-unknown", "entropy {d}/x.npy --frobnicate", 2, "unrecognized arguments"),
    ("budget-low", "select {d}/x.npy --budget 0 --out {o}.npy", 2, "select.budget must be >= 1"),
    ("select-suffix", "select {d}/x.npy --budget 2 --out {o}.txt", 2, "must end in .npy or .parquet"),
    ("until", "run {d}/empty.yaml loop.storage={o} --until 9:nope", 2, "must look like ITER:STAGE"),
    ("feat-missing", "entropy {d}/nowhere.npy", 2, "does not exist"),
    ("npy-empty", "entropy {d}/empty.npy", 2, "at least 2 points"),
    ("npy-str", "entropy {d}/str.npy", 2, "non-numeric dtype"),
    ("npy-nan", "entropy {d}/nan.npy", 2, "NaN or infinite"),
    ("pq-nocol", "entropy {d}/nocol.parquet", 2, "neither an 'embedding' nor an 'image'"),
    ("pq-truncated", "entropy {d}/shards", 2, "b.parquet"),
    ("data-missing", "train --out {o} data.source=folder data.path={d}/nowhere " + " ".join(TRAIN), 2, "does not exist"),
    ("data-empty", "train --out {o} data.source=folder data.path={d}/noimages " + " ".join(TRAIN), 2, "holds no image files"),
    ("data-corrupt", "train --out {o} data.source=folder data.path={d}/corrupt data.n=null " + " ".join(TRAIN[:2]), 2, "corrupt/a.png"),
    ("data-nocol", "train --out {o} data.source=parquet data.path={d}/nocol.parquet " + " ".join(TRAIN), 2, "has no column 'image'"),
    ("ckpt-missing", "generate {d}/nowhere --out {o}.npy " + " ".join(GEN), 2, "does not exist"),
    ("ckpt-foreign", "generate {d}/noimages --out {o}.npy " + " ".join(GEN), 2, "is not a raycollapse checkpoint"),
    ("ckpt-bitflip", "generate {d}/flipped --out {o}.npy " + " ".join(GEN), 2, "does not match its checksum"),
    ("out-exists", "generate {d}/ckpt --out {d}/x.npy " + " ".join(GEN), 2, "already exists; pass --overwrite"),
    ("out-is-input", "generate {d}/ckpt --out {d}/ckpt --overwrite " + " ".join(GEN), 2, "would destroy the input"),
    ("out-blocked", "train --out {d}/afile/sub " + " ".join(TRAIN), 2, "cannot write --out"),
    ("storage-blocked", "run {d}/empty.yaml loop.storage={d}/afile/run", 2, "cannot write to loop.storage"),
    ("clip-truncated", CLIP + "{d}/cut.safetensors", 2, "truncated or damaged safetensors file"),
    ("clip-not-safetensors", CLIP + "{d}/text.safetensors", 2, "are not a safetensors file"),
    ("clip-not-weights", CLIP + "{d}/junk.pt", 2, "cannot load weights"),
    ("clip-other-arch", CLIP + "{d}/unet.safetensors", 2, "do not fit the ViT-B-32 architecture (Missing key(s)"),
    ("clip-shapes", CLIP + "{d}/shapes.safetensors", 2, "do not fit the ViT-B-32 architecture (size mismatch"),
    ("clip-tag-missing", CLIP + "laion2b_s34b_b79k", 2, "are not available on this machine"),
    ("clip-tag-unknown", CLIP + "nosuchtag", 2, "is neither a pretrained tag"),
    ("clip-run", "run {d}/empty.yaml loop.storage={o} features.name=clip features.pretrained={d}/junk.pt", 2, "cannot load weights"),
]  # fmt: skip


def test_every_row_with_an_id_is_documented():
    doc = (ROOT / "docs" / "bad-input.md").read_text()
    documented = set(re.findall(r"\[([a-z0-9-]+)\]", doc))
    assert documented == {_id(r) for r in ROWS}


def _id(row) -> str:
    return (row.values[0] if hasattr(row, "values") else row)[0]


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_bad_input(row, inputs, tmp_path, capsys):
    _, line, status, fragment = row
    out = tmp_path / "out"
    argv = line.format(d=inputs, o=out).split()
    before = sorted(p.name for p in inputs.iterdir())
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    assert fragment in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a refused command left output behind"
    assert sorted(p.name for p in inputs.iterdir()) == before
