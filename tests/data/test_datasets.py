"""Data sources on small fixtures built here: digits, a CIFAR pickle batch, an image folder, Parquet."""

import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycollapse.config import load_config
from raycollapse.data.records import (
    Records,
    encode_png,
    prepare_image,
)
from raycollapse.data.sources import load_records
from raycollapse.errors import UserInputError
from raycollapse.io.grids import image_grid


def data_cfg(**over):
    return load_config(
        None, [f"data.{k}={'null' if v is None else v}" for k, v in over.items()]
    ).data


def test_digits_default():
    rec = load_records(data_cfg())
    assert rec.images.shape == (1797, 8, 8, 1) and rec.images.dtype == np.uint8
    assert rec.images.max() == 255 and rec.images.min() == 0  # 16 -> 255
    assert set(np.unique(rec.labels)) == set(range(10)) and rec.source == "digits"
    assert np.array_equal(rec.ids, np.arange(1797))


def test_digits_seeded_subset_resized_rgb():
    a = load_records(data_cfg(n=50, seed=1, resolution=16, channels=3))
    b = load_records(data_cfg(n=50, seed=1, resolution=16, channels=3))
    c = load_records(data_cfg(n=50, seed=2))
    assert a.images.shape == (50, 16, 16, 3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.images, b.images)
    assert np.all(np.diff(a.ids) > 0) and not np.array_equal(a.ids, c.ids)
    assert np.array_equal(a.images[..., 0], a.images[..., 2])  # gray replicated
    with pytest.raises(UserInputError, match="only 1797"):
        load_records(data_cfg(n=5000))


def _cifar_dir(tmp_path, n=6):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump(
            {b"data": data, b"labels": list(range(n)), b"batch_label": b"training batch 1 of 5"}, fh
        )
    return folder, data


def test_cifar_batches(tmp_path):
    folder, data = _cifar_dir(tmp_path)
    rec = load_records(data_cfg(source="cifar10", path=folder, resolution=32, channels=3))
    assert rec.images.shape == (6, 32, 32, 3) and list(rec.labels) == list(range(6))
    assert np.array_equal(rec.images[2, :, :, 0], data[2, :1024].reshape(32, 32))  # red plane first
    assert np.array_equal(rec.images[2, :, :, 2], data[2, 2048:].reshape(32, 32))
    small = load_records(data_cfg(source="cifar10", path=folder, resolution=16, channels=1, n=3))
    assert small.images.shape == (3, 16, 16, 1)


def test_cifar_refuses_code_and_bad_paths(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump(os.getcwd, fh)  # would call a function when unpickled by plain pickle
    with pytest.raises(UserInputError, match="not a CIFAR-10 python batch"):
        load_records(data_cfg(source="cifar10", path=folder, resolution=32, channels=3))
    with pytest.raises(UserInputError, match="does not exist"):
        load_records(data_cfg(source="cifar10", path=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="data_batch_1"):
        load_records(data_cfg(source="cifar10", path=tmp_path / "empty"))
    with pytest.raises(UserInputError, match="needs data.path"):
        load_records(data_cfg(source="cifar10"))


def _image_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
            folder / f"rgb{i}.png"
        )
    Image.fromarray(np.full((10, 10), 200, dtype=np.uint8)).save(folder / "sub" / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (folder / "rgb0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / "tiny.png")
    return folder


def test_folder_skip_corrupt_and_small(tmp_path):
    folder = _image_folder(tmp_path)
    rec = load_records(
        data_cfg(
            source="folder",
            path=folder,
            resolution=8,
            channels=3,
            on_corrupt="skip",
            on_small="skip",
        )
    )
    assert len(rec) == 5 and rec.skipped == 3
    assert {os.path.basename(n) for n in rec.skipped_names} == {
        "broken.png",
        "truncated.png",
        "tiny.png",
    }
    assert rec.images.shape == (5, 8, 8, 3) and (rec.labels == -1).all() and not rec.has_labels
    gray = rec.images[
        list(rec.ids).index(5)
    ]  # sorted: broken, rgb0..rgb3, sub/gray, tiny, truncated
    assert (gray == 200).all()
    up = load_records(
        data_cfg(
            source="folder",
            path=folder,
            resolution=8,
            channels=1,
            on_corrupt="skip",
            on_small="upscale",
        )
    )
    assert len(up) == 6 and up.images.shape[1:] == (8, 8, 1)
    # n with skipped files: replaced by the next readable ones in the seeded order
    sub = load_records(
        data_cfg(
            source="folder", path=folder, resolution=8, on_corrupt="skip", on_small="skip", n=4
        )
    )
    assert len(sub) == 4


def test_folder_errors_name_the_file(tmp_path):
    folder = _image_folder(tmp_path)
    with pytest.raises(UserInputError, match="broken.png"):
        load_records(data_cfg(source="folder", path=folder, resolution=8, on_small="skip"))
    with pytest.raises(UserInputError, match=r"tiny.png' is 4x4, smaller than data.resolution=8"):
        load_records(data_cfg(source="folder", path=folder, resolution=8, on_corrupt="skip"))
    (tmp_path / "none").mkdir()
    with pytest.raises(UserInputError, match="holds no image files"):
        load_records(data_cfg(source="folder", path=tmp_path / "none"))
    with pytest.raises(UserInputError, match="does not exist"):
        load_records(data_cfg(source="folder", path=tmp_path / "nowhere"))


def test_parquet_bytes_and_arrays(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    rec = Records(np.arange(5, dtype=np.int64), imgs, np.array([0, 1, -1, 3, 4]), "test")
    table = rec.to_arrow_table()
    assert table.column("label").null_count == 1 and pa.types.is_binary(
        table.schema.field("image").type
    )
    pq.write_table(table, tmp_path / "a.parquet")
    back = load_records(
        data_cfg(source="parquet", path=tmp_path / "a.parquet", resolution=8, channels=1)
    )
    assert np.array_equal(back.images, imgs) and list(back.labels) == [0, 1, -1, 3, 4]
    # arrays: nested H x W x C lists in one shard, flat lists in another, no label column
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"pixels": [im.tolist() for im in imgs[:2]]}), shards / "p0.parquet")
    pq.write_table(
        pa.table({"pixels": [im.reshape(-1).tolist() for im in imgs[2:]]}), shards / "p1.parquet"
    )
    arr = load_records(
        data_cfg(source="parquet", path=shards, resolution=8, channels=1, image_column="pixels")
    )
    assert np.array_equal(arr.images, imgs) and (arr.labels == -1).all()
    with pytest.raises(UserInputError, match="no column 'img'"):
        load_records(data_cfg(source="parquet", path=shards, image_column="img"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [b"junk", encode_png(imgs[0])]}), bad)
    with pytest.raises(UserInputError, match="row 0"):
        load_records(data_cfg(source="parquet", path=bad))
    assert load_records(data_cfg(source="parquet", path=bad, on_corrupt="skip")).skipped == 1


def test_prepare_image_crops_the_centre():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, 10:30] = 255  # a bright centre band, cut off by the crop
    out = prepare_image(img, resolution=10, channels=3)
    assert out.shape == (10, 10, 3) and out.min() > 200
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    assert prepare_image(rgba, resolution=12, channels=1).shape == (12, 12, 1)


def test_image_grid_tiles_with_padding():
    imgs = np.full((3, 2, 2, 1), 255, dtype=np.uint8)
    grid = image_grid(imgs)
    assert grid.shape == (7, 7)  # 2 x 2 tiles of 2 px + 1 px padding
    assert (grid[1:3, 1:3] == 255).all() and (grid[4:6, 4:6] == 128).all()  # 4th tile empty
