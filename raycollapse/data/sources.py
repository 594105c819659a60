"""Readers for the data sources of ``data/records.py`` (digits, CIFAR-10 batches, folder, Parquet)
and of ``data/vectors.py`` (mog: vectors drawn from a mixture of Gaussians).

Each image reader returns ``Records`` already prepared (channels, resolution) and subset (``data.n``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.config.schema import DataConfig
from raycollapse.data.records import Records, TooSmall, prepare_checked, subset_order
from raycollapse.data.vectors import VectorRecords, mog_records
from raycollapse.errors import UserInputError
from raycollapse.io.images import decode_value, list_image_files

PATH_HINTS = {
    "cifar10": "CIFAR-10 python-batches folder (cifar-10-batches-py) or one batch file",
    "folder": "folder of image files",
    "parquet": "Parquet file or folder of Parquet shards",
}


def collect(
    cfg,
    total: int,
    read: Callable[[int], np.ndarray],
    name_of: Callable[[int], str],
    labels: np.ndarray | None,
    source: str,
    *,
    on_small: str | None = None,
) -> Records:
    """Walk the (seeded) order, prepare each image, skip or refuse bad ones, keep ``data.n``.

    ``read(i)`` returns the raw uint8 image ``i`` or raises ``UserInputError`` when unreadable:
    skipped and counted with ``data.on_corrupt=skip``, re-raised (naming the file) with ``error``.
    """
    on_small = on_small or cfg.on_small
    order = subset_order(total, cfg.n, cfg.seed)
    want = total if cfg.n is None else cfg.n
    kept_ids: list[int] = []
    kept: list[np.ndarray] = []
    skipped: list[str] = []
    for i in order:
        if len(kept) == want:
            break
        name = name_of(int(i))
        try:
            raw = read(int(i))
        except UserInputError:
            if cfg.on_corrupt == "error":
                raise
            skipped.append(name)  # unreadable, with on_corrupt=skip
            continue
        try:
            img = prepare_checked(
                raw, resolution=cfg.resolution, channels=cfg.channels, on_small=on_small, name=name
            )
        except TooSmall:
            skipped.append(name)  # below the resolution, with on_small=skip
            continue
        kept_ids.append(int(i))
        kept.append(img)
    if not kept:
        raise UserInputError(
            f"no usable image in {source}: {len(skipped)} skipped (unreadable or too small), e.g. "
            f"{', '.join(skipped[:3])}. Check data.path, data.on_small and data.resolution."
        )
    if cfg.n is not None and len(kept) < cfg.n:
        raise UserInputError(
            f"data.n={cfg.n} but only {len(kept)} of the {total} images in {source} are usable "
            f"({len(skipped)} skipped); lower data.n."
        )
    ids = np.asarray(kept_ids, dtype=np.int64)
    order_back = np.argsort(ids, kind="stable")
    lab = np.full(len(ids), -1, dtype=np.int64) if labels is None else labels[ids]
    return Records(
        ids=ids[order_back],
        images=np.stack(kept)[order_back],
        labels=lab[order_back],
        source=source,
        skipped=len(skipped),
        skipped_names=tuple(skipped),
    )


def digits_records(cfg: DataConfig) -> Records:
    """scikit-learn's digits, 0..16 scaled to uint8 with ``round(v * 255 / 16)``; always upscaled."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    labels = d.target.astype(np.int64)
    if (
        cfg.n is None and cfg.resolution == 8 and cfg.channels == 1
    ):  # the common case: no per-image work
        return Records(np.arange(len(images), dtype=np.int64), images, labels, "digits")
    return collect(
        cfg,
        len(images),
        lambda i: images[i],
        lambda i: f"digits[{i}]",
        labels,
        "digits",
        on_small="upscale",
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, lists, dicts and scalars only: a CIFAR batch cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        OSError,
    ) as exc:
        raise UserInputError(
            f"'{path}' is not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); point data.path to the "
            "cifar-10-batches-py folder from https://www.cs.toronto.edu/~kriz/cifar.html."
        ) from None
    if len(labels) != len(images):
        raise UserInputError(
            f"CIFAR batch '{path}' has {len(images)} images but {len(labels)} labels."
        )
    return images, labels


def cifar10_records(cfg: DataConfig) -> Records:
    """The training batches ``data_batch_*`` of a CIFAR-10 python folder (or one batch file)."""
    root = Path(cfg.path)
    if not root.exists():
        raise UserInputError(
            f"data.path '{root}' does not exist; pass the cifar-10-batches-py folder."
        )
    files = [root] if root.is_file() else sorted(root.glob("data_batch_*"))
    if not files:
        raise UserInputError(
            f"no CIFAR-10 training batches (data_batch_1 ... data_batch_5) in '{root}'; pass the "
            "cifar-10-batches-py folder or one batch file."
        )
    parts = [_read_cifar_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return collect(
        cfg, len(images), lambda i: images[i], lambda i: f"{root}[{i}]", labels, f"cifar10:{root}"
    )


def folder_records(cfg: DataConfig) -> Records:
    """Every image file under ``data.path`` (sorted paths; ids index that order); no labels."""
    files = list_image_files(cfg.path)
    return collect(
        cfg, len(files), lambda i: decode_value(files[i], cfg.channels, name=str(files[i])),
        lambda i: str(files[i]), None, f"folder:{cfg.path}",
    )  # fmt: skip


def parquet_records(cfg: DataConfig) -> Records:
    """Images from ``data.image_column`` (encoded bytes or arrays), labels from ``data.label_column``."""
    root = Path(cfg.path)
    if not root.exists():
        raise UserInputError(
            f"data.path '{root}' does not exist; pass a Parquet file or a folder of shards."
        )
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise UserInputError(f"no .parquet files under '{root}'.")
    # Shards are read one by one (their image columns may differ: bytes in one, arrays in another).
    chunks: list[pa.Array] = []
    label_parts: list[np.ndarray] = []
    any_labels = False
    for f in files:
        try:
            names = pq.read_schema(f).names
            if cfg.image_column not in names:
                raise UserInputError(
                    f"Parquet '{f}' has no column '{cfg.image_column}' (it has {', '.join(names)}); "
                    "set data.image_column."
                )
            has_label = cfg.label_column is not None and cfg.label_column in names
            table = pq.read_table(
                f, columns=[cfg.image_column] + ([cfg.label_column] if has_label else [])
            )
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserInputError(f"cannot read Parquet '{f}': {exc}") from None
        chunks.append(table.column(cfg.image_column).combine_chunks())
        if has_label:
            col = table.column(cfg.label_column).combine_chunks()
            if not pa.types.is_integer(col.type):
                raise UserInputError(
                    f"label column '{cfg.label_column}' of '{f}' has type {col.type}; expected integers."
                )
            label_parts.append(
                np.asarray(col.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            )
            any_labels = True
        else:
            label_parts.append(np.full(len(table), -1, dtype=np.int64))
    starts = np.cumsum([0] + [len(c) for c in chunks])
    labels = np.concatenate(label_parts) if any_labels else None

    def read(i: int) -> np.ndarray:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        value = chunks[k][i - int(starts[k])].as_py()
        return decode_value(value, cfg.channels, name=f"{root} row {i}")

    return collect(
        cfg, int(starts[-1]), read, lambda i: f"{root} row {i}", labels, f"parquet:{root}"
    )


def load_records(cfg: DataConfig) -> Records | VectorRecords:
    """Read ``cfg`` (the ``data`` config section) into memory (see ``data/records.py``; the
    ``mog`` source gives vectors, ``data/vectors.py``)."""
    if cfg.channels not in (1, 3):
        raise UserInputError(f"data.channels must be 1 or 3, got {cfg.channels}.")
    if cfg.resolution < 1:
        raise UserInputError(f"data.resolution must be >= 1, got {cfg.resolution}.")
    if cfg.source == "digits":
        return digits_records(cfg)
    if cfg.source == "mog":
        return mog_records(cfg)
    if cfg.path in (None, ""):
        raise UserInputError(
            f"data.source={cfg.source} needs data.path (a {PATH_HINTS[cfg.source]})."
        )
    reader = {
        "cifar10": cifar10_records,
        "folder": folder_records,
        "parquet": parquet_records,
    }
    return reader[cfg.source](cfg)
