"""Manifests of the loop's stage outputs: every file, its size, Parquet row count and sha256.

A stage's manifest is computed once, right after its outputs are written, and stored in its
completion marker (written last, atomically: the manifest never exists without complete
outputs). On resume :func:`verify` recomputes the checksums of a finished stage's files; a
missing, truncated or changed file makes the stage unfinished again (``runner`` redoes it from
its inputs, which are verified the same way). Paths are relative to the run folder, so a run
copied or moved elsewhere verifies the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.io import storage
from raycollapse.loop import layout

_CHUNK = 1 << 20


def stage_outputs(t: int, stage: str) -> list[str]:
    """The files and folders stage ``stage`` of iteration ``t`` writes, relative to the run
    (``t`` is ignored for stage ``real``)."""
    it = f"iter_{t:03d}"
    if stage == "real":
        return ["real"]
    named = {
        "train_set": [layout.TRAIN_SET],
        "train": [layout.MODEL],
        "generate": [layout.POOL],
        "embed": [layout.EMBEDDINGS],
        "metrics": [layout.ITER_METRICS, layout.SAMPLES_PNG, layout.NEAREST],
    }[stage]
    return [f"{it}/{p}" for p in named]


def _files(run: str, rel: str) -> list[str]:
    """Files (relative to ``run``) at or under ``run/rel``, temporary (dot) names excluded."""
    fs, base = storage.open_fs(run)
    fs_path = f"{base.rstrip('/')}/{rel}"
    info = fs.get_file_info(fs_path)
    if info.type == storage.pafs.FileType.File:
        return [rel]
    if info.type == storage.pafs.FileType.NotFound:
        return []
    found = fs.get_file_info(storage.pafs.FileSelector(fs_path, recursive=True))
    out = []
    for f in found:
        sub = f.path[len(base.rstrip("/")) + 1 :]
        if f.type == storage.pafs.FileType.File and not any(
            p.startswith(".") for p in sub.split("/")
        ):
            out.append(sub)
    return sorted(out)


def file_entry(uri: str) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of one file, plus ``"rows"`` for Parquet (from its footer)."""
    fs, path = storage.open_fs(uri)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as src:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    entry: dict[str, Any] = {"bytes": size, "sha256": h.hexdigest()}
    if uri.endswith(".parquet"):
        entry["rows"] = pq.read_metadata(path, filesystem=fs).num_rows
    return entry


def build(run: str, t: int, stage: str) -> dict[str, dict[str, Any]]:
    """The manifest of a stage's outputs as written now: relative path -> entry."""
    return {
        rel: file_entry(storage.join(run, rel))
        for out in stage_outputs(t, stage)
        for rel in _files(run, out)
    }


def verify(run: str, manifest: dict[str, dict[str, Any]]) -> str | None:
    """None when every file of ``manifest`` is present with its size and checksum; else a
    sentence naming the first file that is missing, truncated or changed."""
    for rel, want in sorted(manifest.items()):
        uri = storage.join(run, rel)
        if not storage.exists(uri):
            return f"'{uri}' is missing"
        try:
            got = file_entry(uri)
        except (OSError, pa.ArrowInvalid) as exc:
            return f"'{uri}' cannot be read ({exc})"
        if got["bytes"] != want["bytes"]:
            return f"'{uri}' has {got['bytes']} bytes, {want['bytes']} were written (truncated?)"
        if got["sha256"] != want["sha256"]:
            return f"'{uri}' does not match its checksum (changed or corrupt)"
    return None


def remove_outputs(run: str, t: int, stage: str) -> None:
    """Delete what a stage wrote (before it is redone: a damaged shard must not be resumed)."""
    for rel in stage_outputs(t, stage):
        uri = storage.join(run, rel)
        fs, path = storage.open_fs(uri)
        info = fs.get_file_info(path)
        if info.type == storage.pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == storage.pafs.FileType.File:
            fs.delete_file(path)
