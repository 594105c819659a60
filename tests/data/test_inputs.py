"""INPUT formats of `entropy` / `select`: .npy, Parquet (file, folder), image folders; bad inputs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycollapse.data.inputs import images_to_pixels, load_features
from raycollapse.errors import UserInputError


def _png_bytes(arr: np.ndarray, tmp_path, name="x.png") -> bytes:
    p = tmp_path / name
    Image.fromarray(arr).save(p)
    return p.read_bytes()


def test_npy_embeddings_and_images(tmp_path):
    emb = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float64)
    np.save(tmp_path / "e.npy", emb)
    got = load_features(tmp_path / "e.npy")
    assert got.kind == "embedding" and got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, emb.astype(np.float32))

    imgs = np.arange(4 * 3 * 2 * 3, dtype=np.uint8).reshape(4, 3, 2, 3)
    np.save(tmp_path / "i.npy", imgs)
    got = load_features(tmp_path / "i.npy")
    assert got.kind == "pixels" and got.features.shape == (4, 18)
    np.testing.assert_allclose(got.features, imgs.reshape(4, -1) / 255.0, rtol=1e-6)

    gray = np.zeros((3, 4, 4), dtype=np.float32) + 0.5
    np.save(tmp_path / "g.npy", gray)
    assert load_features(tmp_path / "g.npy").features.shape == (3, 16)


def test_parquet_embedding_file_and_folder(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, part in enumerate((a, b)):
        ids = np.arange(len(part)) + (0 if i == 0 else len(a))
        t = pa.table(
            {
                "id": ids,
                "embedding": pa.array(list(part.astype(np.float32)), pa.list_(pa.float32())),
            }
        )
        pq.write_table(t, folder / f"part-{i:05d}.parquet")
    got = load_features(folder)
    np.testing.assert_allclose(got.features, np.vstack([a, b]).astype(np.float32))
    np.testing.assert_array_equal(got.ids, np.arange(11))
    one = load_features(folder / "part-00001.parquet")
    np.testing.assert_allclose(one.features, b.astype(np.float32))


def test_parquet_fixed_size_list_and_image_bytes(tmp_path):
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    pq.write_table(pa.table({"embedding": fixed}), tmp_path / "f.parquet")
    np.testing.assert_array_equal(
        load_features(tmp_path / "f.parquet").features, np.arange(12).reshape(4, 3)
    )

    imgs = [np.full((4, 4), v, dtype=np.uint8) for v in (0, 128, 255)]
    blobs = [_png_bytes(im, tmp_path, f"{i}.png") for i, im in enumerate(imgs)]
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "img.parquet")
    got = load_features(tmp_path / "img.parquet")
    np.testing.assert_allclose(got.features, images_to_pixels(np.stack(imgs)))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, size=(3, 5, 5, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    got = load_features(tmp_path)
    np.testing.assert_allclose(got.features, imgs.reshape(3, -1) / 255.0, rtol=1e-6)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_features(tmp_path / "missing.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no image files"):
        load_features(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(UserInputError, match="cannot read image.*a.png"):
        load_features(broken)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mixed / "b.png")
    with pytest.raises(UserInputError, match="differ"):
        load_features(mixed)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserInputError, match="neither an 'embedding' nor an 'image'.*x"):
        load_features(tmp_path / "nocol.parquet")
    ragged = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"embedding": ragged}), tmp_path / "ragged.parquet")
    with pytest.raises(UserInputError, match="differ in dimension"):
        load_features(tmp_path / "ragged.parquet")
    np.save(tmp_path / "one_d.npy", np.zeros(5))
    with pytest.raises(UserInputError, match="shape"):
        load_features(tmp_path / "one_d.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserInputError, match="not a supported format"):
        load_features(tmp_path / "x.txt")
