"""raycollapse.io: atomic writes of files and folders, Parquet list columns, image columns."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.atomic import atomic_dir, atomic_path, install_dir, temp_name
from raycollapse.io.images import decode_column
from raycollapse.io.parquet import list_column_to_matrix, read_embeddings, read_images


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


BLANK = _png(np.zeros((2, 2), np.uint8))

# ------------------------------------------------------------------------------ atomic writes


def test_temp_name_is_hidden_unique_and_keeps_the_suffix():
    a, b = temp_name("sel.npy"), temp_name("sel.npy")
    assert a != b
    assert a.startswith(".sel.tmp-") and a.endswith(".npy") and len(a) == len(".sel.tmp-.npy") + 8
    assert temp_name("model", "old").startswith(".model.old-")
    assert temp_name("a.tar.gz").startswith(".a.tar.tmp-") and temp_name("a.tar.gz").endswith(".gz")


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "x.npy"
    with atomic_path(target) as tmp:
        np.save(tmp, np.arange(3))  # np.save would append .npy to a name without it
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        np.save(tmp, np.arange(5))
        raise RuntimeError("crash mid-write")
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(os.listdir(target.parent)) == ["x.npy"]


def test_atomic_dir_swaps_a_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "a.txt").write_text("1")
    assert sorted(os.listdir(target)) == ["a.txt"]
    with atomic_dir(target) as tmp:  # replaces: files of the old folder do not survive
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(target)) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("crash mid-write")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old folder left


def test_install_dir_copies_a_tree(tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.bin").write_bytes(b"\x00\x01")
    (src / "meta.json").write_text("{}")
    target = tmp_path / "out" / "model"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    install_dir(src, target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "meta.json",
        "unet",
        "unet/w.bin",
    ]
    assert (target / "unet" / "w.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(target.parent)) == ["model"]


def test_storage_writes_through_the_same_temp_rule(tmp_path):
    uri = tmp_path / "shards" / "part-00000.parquet"
    storage.write_parquet_atomic(pa.table({"id": [1, 2]}), uri)
    assert sorted(os.listdir(uri.parent)) == ["part-00000.parquet"]
    (uri.parent / temp_name("part-00001.parquet")).write_bytes(b"half")  # a crashed writer
    assert storage.list_files(uri.parent) == [str(uri)]


# ------------------------------------------------------------------- list column -> matrix


def test_list_column_to_matrix_fixed_and_variable_lists():
    x = np.random.default_rng(0).normal(size=(5, 3))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)
    var = pa.array(list(x), pa.list_(pa.float64()))
    fixed32 = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(np.float32)), 3)
    for values in (fixed, fixed32, var, pa.chunked_array([var[:2], var[2:]])):
        got = list_column_to_matrix(values, "embedding", "src")
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, x.astype(np.float32))
    pixels = pa.array([[0, 255], [7, 9]], pa.list_(pa.uint8()))
    kept = list_column_to_matrix(pixels, "image", "src", dtype=None)
    assert kept.dtype == np.uint8 and kept.tolist() == [[0, 255], [7, 9]]
    empty = list_column_to_matrix(pa.array([], pa.list_(pa.float32())), "embedding", "src")
    assert empty.shape == (0, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            pa.array([[1.0], None, None], pa.list_(pa.float32())),
            "column 'embedding' of 'src' has 2 null rows; drop or fill them.",
        ),
        (
            pa.array([[1.0, 2.0], [1.0, 2.0], [3.0]], pa.list_(pa.float32())),
            "rows of column 'embedding' of 'src' differ in dimension: row 0 has 2 values, "
            "row 2 has 1; every row must have the same dimension.",
        ),
        (
            pa.array([1.0, 2.0]),
            "column 'embedding' of 'src' has type double; expected a list of numbers.",
        ),
    ],
)
def test_list_column_to_matrix_errors(values, message):
    with pytest.raises(UserInputError) as info:
        list_column_to_matrix(values, "embedding", "src")
    assert str(info.value) == message


def test_read_shard_folders_in_id_order(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 3, 3, 3), dtype=np.uint8)
    emb = rng.normal(size=(4, 2)).astype(np.float32)
    for part, rows in enumerate(([3, 1], [0, 2])):  # ids out of order across shards
        pq.write_table(
            pa.table(
                {
                    "id": pa.array(rows, pa.int64()),
                    "image": pa.array([_png(images[i]) for i in rows], pa.binary()),
                    "label": pa.array([None if i == 1 else i for i in rows], pa.int64()),
                    "embedding": pa.array(list(emb[rows]), pa.list_(pa.float32())),
                }
            ),
            tmp_path / f"part-{part:05d}.parquet",
        )
    ids, got, labels = read_images(str(tmp_path), 3)
    assert ids.tolist() == [0, 1, 2, 3] and labels.tolist() == [0, -1, 2, 3]
    np.testing.assert_array_equal(got, images)
    ids, x = read_embeddings(str(tmp_path))
    assert ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(x, emb)


# -------------------------------------------------------------------------- image columns


def test_decode_column_bytes_arrays_and_tensor_batches():
    rgb = np.random.default_rng(2).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    gray = rgb[:, :, 0].copy()
    out = decode_column(pa.array([_png(rgb), _png(gray)], pa.binary()), name="t")
    np.testing.assert_array_equal(out[0], rgb)
    np.testing.assert_array_equal(out[1], gray[:, :, None])
    as_gray = decode_column([_png(rgb)], 1, name="t")[0]
    assert as_gray.shape == (4, 4, 1)
    np.testing.assert_array_equal(as_gray[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    cells = [rgb.reshape(-1).tolist(), gray.tolist(), np.full((2, 2), 0.5)]
    flat, nested, floats = decode_column(cells, name="t")
    np.testing.assert_array_equal(flat, rgb)  # a flat square 3-channel list
    np.testing.assert_array_equal(nested, gray[:, :, None])
    assert floats.dtype == np.uint8 and (floats == 128).all()  # round(0.5 * 255)
    batch = np.stack([rgb, rgb[::-1]])
    rows = decode_column(batch, name="t")  # a numeric batch: its rows as they are
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[1], rgb[::-1])
    assert decode_column(batch[..., 0], name="t")[0].shape == (4, 4, 1)


@pytest.mark.parametrize(
    ("cells", "kwargs", "message"),
    [
        ([BLANK, None], {"name": "pool"}, "pool row 1: the image is null; drop or fill that row."),
        (
            [None],
            {"name": "pool", "first_row": 40},
            "pool row 40: the image is null; drop or fill that row.",
        ),
        (
            [None],
            {"row_names": ["id 17"]},
            "id 17: the image is null; drop or fill that row.",
        ),
        (
            ["photo.png"],  # a str cell is data, never opened as a file
            {"name": "pool"},
            "pool row 0: image array must be H x W, H x W x C or a flat list of pixels.",
        ),
        (
            [[1.5, 0.0, 0.0, 0.0]],
            {"name": "pool"},
            "pool row 0: float image arrays must be in [0, 1].",
        ),
        (
            [list(range(5))],
            {"name": "pool"},
            "pool row 0: a flat image of 5 values is not a square 1- or 3-channel image.",
        ),
    ],
)
def test_decode_column_errors_name_the_row(cells, kwargs, message):
    with pytest.raises(UserInputError) as info:
        decode_column(cells, **kwargs)
    assert str(info.value) == message


def test_decode_column_unreadable_bytes_name_the_row():
    with pytest.raises(UserInputError, match=r"^cannot read image 'shard-3 row 1': .*Remove"):
        decode_column([BLANK, b"not a png"], name="shard-3")
