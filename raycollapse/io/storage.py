"""Paths that are local folders or URIs pyarrow filesystems understand (s3://, gs://, ...).

Every output is written atomically: to a temporary name beside the target, then moved onto it,
so a retried task or a restarted actor never leaves a half-written or duplicated shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycollapse.errors import UserInputError
from raycollapse.io.atomic import temp_name


def open_fs(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI."""
    text = str(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UserInputError(f"cannot open storage '{text}': {exc}") from None


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a local path or a URI with '/'."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str | Path) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = open_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | Path) -> None:
    """Create the folder ``uri`` and its parents (no error when it exists)."""
    fs, path = open_fs(uri)
    fs.create_dir(path, recursive=True)


def write_bytes_atomic(uri: str | Path, data: bytes) -> None:
    """Write ``data`` to ``uri`` through a temporary name (:func:`~raycollapse.io.atomic.temp_name`)
    and a move."""
    fs, path = open_fs(uri)
    head, _, tail = path.rpartition("/")
    fs.create_dir(head, recursive=True)
    tmp = f"{head}/{temp_name(tail)}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_text_atomic(uri: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``uri`` atomically."""
    write_bytes_atomic(uri, text.encode())


def read_text(uri: str | Path) -> str:
    """The UTF-8 text of the file at ``uri``."""
    fs, path = open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_parquet_atomic(table: pa.Table, uri: str | Path) -> None:
    """One Parquet file, written whole or not at all."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(uri, buf.getvalue())


def list_files(uri: str | Path, suffix: str = ".parquet") -> list[str]:
    """Files under a folder ending in ``suffix``, sorted by name; temporary files excluded."""
    fs, path = open_fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [str(uri)]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and f.path.endswith(suffix)
        and not f.base_name.startswith(".")
    )
    prefix = str(uri).rstrip("/")
    base = path.rstrip("/")
    return [prefix + n[len(base) :] for n in names]


def read_parquet(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (or a folder pyarrow reads as one table), optionally some columns.

    A truncated or damaged file, or a missing column, is a ``UserInputError`` naming the file."""
    fs, path = open_fs(uri)
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(
            f"cannot read Parquet file '{uri}': {exc}. The file is damaged or incomplete: "
            "replace it, or remove it and re-run the command that wrote it."
        ) from None


def is_dir(uri: str | Path) -> bool:
    """Whether ``uri`` is an existing folder."""
    fs, path = open_fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def write_parquet_tables_atomic(tables: Iterable[pa.Table], uri: str | Path) -> int:
    """One Parquet file from consecutive tables of one schema, each written as it comes (one row
    group each, at most ``pq.write_table``'s default size), through a temporary name and a move:
    whole or not at all. For a single table the file is ``write_parquet_atomic``'s, byte for
    byte. Returns the number of rows written."""
    fs, path = open_fs(uri)
    head, _, tail = path.rpartition("/")
    fs.create_dir(head, recursive=True)
    tmp = f"{head}/{temp_name(tail)}"
    rows = 0
    try:
        with fs.open_output_stream(tmp) as out:
            writer: pq.ParquetWriter | None = None
            try:
                for table in tables:
                    if writer is None:
                        writer = pq.ParquetWriter(out, table.schema)
                    writer.write_table(table)
                    rows += table.num_rows
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                raise ValueError(f"no rows to write to '{uri}'")
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
    return rows
