"""Read run folders into plain data for the report: config, metric rows, grids, nearest pairs.

Everything a run may lack (an unfinished iteration, a missing file, an unreadable Parquet file)
becomes a note on the run instead of an exception: a report of a run in progress must still
render. Only a path that is not a run folder at all is an error (``validate_run``).

File names come from ``raycollapse.loop.layout``; paths may be local or URIs
(``raycollapse.io.storage``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.loop import layout

# Reading a broken file must not stop the report: these are what pyarrow, json and yaml raise.
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, yaml.YAMLError, UnicodeDecodeError)

NEAREST_COLUMNS = ("gen_id", "train_id", "d1", "d2", "gen_image", "train_image")


@dataclass
class NearestPair:
    """One memorized sample: the generated image and its nearest training image."""

    gen_id: int
    train_id: int
    d1: float  # distance to the nearest training sample
    d2: float  # distance to the second nearest
    gen_image: bytes | None
    train_image: bytes | None

    @property
    def memorized(self) -> bool:
        """d1 < d2/3, written as the definition (docs/design.md, "Memorized fraction"); the
        ratio d1/d2 < 1/3 rounds differently within an ulp of the boundary."""
        return self.d1 < self.d2 / 3

    @property
    def ratio(self) -> float:
        """d1/d2, shown beside the pair. ``inf`` when d2 is 0 and d1 is not."""
        if self.d2 > 0:
            return self.d1 / self.d2
        return 0.0 if self.d1 == 0 else math.inf


@dataclass
class IterationData:
    """What one ``iter_<nnn>`` folder holds for the report."""

    iteration: int
    samples_png: bytes | None = None
    nearest: list[NearestPair] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # human-readable, e.g. "samples.png missing"


@dataclass
class RunData:
    """One run, read: ``name`` is unique among the runs of one report."""

    name: str
    path: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # metric rows sorted by iteration, one per finished iteration
    iterations: list[IterationData]
    notes: list[str] = field(default_factory=list)  # what is missing or unreadable

    @property
    def iterations_finished(self) -> int:
        return len(self.rows)

    @property
    def iterations_planned(self) -> int | None:
        value = config_value(self.config, "loop.iterations")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def last_row(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """``config["loop"]["paradigm"]`` for ``"loop.paradigm"``; ``None`` when any part is absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate_run(path: str) -> None:
    """Raise ``UserInputError`` unless ``path`` is a folder holding a config or metrics file."""
    try:
        found = storage.exists(path)
    except OSError as exc:
        raise UserInputError(f"cannot read run '{path}': {exc}. Check the path.") from None
    if not found:
        raise UserInputError(
            f"run folder '{path}' does not exist; pass the folder a `raycollapse run` wrote "
            "(its loop.storage)."
        )
    if not (
        storage.exists(storage.join(path, layout.CONFIG))
        or storage.exists(storage.join(path, layout.METRICS_JSON))
    ):
        raise UserInputError(
            f"'{path}' is not a run folder: it holds neither {layout.CONFIG} nor "
            f"{layout.METRICS_JSON}; pass the folder a `raycollapse run` wrote."
        )


def unique_names(paths: list[str]) -> list[str]:
    """Folder names, made unique: ``parent/name`` when names clash, then a ``#2`` suffix."""
    parts = [PurePosixPath(str(p).split("://", 1)[-1].rstrip("/")).parts or ("run",) for p in paths]
    names = [p[-1] for p in parts]
    clashing = {n for n in names if names.count(n) > 1}
    names = ["/".join(p[-2:]) if n in clashing else n for n, p in zip(names, parts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _read_bytes(uri: str) -> bytes:
    fs, path = storage.open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _iteration_folders(run: str) -> list[int]:
    """Iterations that have a folder, matched against ``layout.iter_dir`` (no name hard-coded)."""
    fs, path = storage.open_fs(run)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    found = []
    for info in infos:
        m = re.fullmatch(r"\D*(\d+)", info.base_name)
        if info.type == pafs.FileType.Directory and m:
            i = int(m.group(1))
            if layout.iter_dir(run, i).rsplit("/", 1)[-1] == info.base_name:
                found.append(i)
    return sorted(found)


def _is_row(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("iteration"), int)


def _read_rows(run: str, notes: list[str]) -> list[dict[str, Any]]:
    """The run's metrics.json rows (falling back to metrics.parquet), sorted, one per iteration."""
    rows: list[dict[str, Any]] = []
    json_uri = storage.join(run, layout.METRICS_JSON)
    parquet_uri = storage.join(run, layout.METRICS_PARQUET)
    if storage.exists(json_uri):
        try:
            data = json.loads(storage.read_text(json_uri))
            if not isinstance(data, list):
                raise ValueError("not a JSON list of rows")
            rows = [r for r in data if _is_row(r)]
            if len(rows) < len(data):
                notes.append(
                    f"{layout.METRICS_JSON}: {len(data) - len(rows)} rows without an iteration skipped"
                )
        except _READ_ERRORS as exc:
            notes.append(f"{layout.METRICS_JSON} unreadable: {exc}")
    elif storage.exists(parquet_uri):
        try:
            rows = [r for r in storage.read_parquet(parquet_uri).to_pylist() if _is_row(r)]
        except _READ_ERRORS as exc:
            notes.append(f"{layout.METRICS_PARQUET} unreadable: {exc}")
    else:
        notes.append(f"{layout.METRICS_JSON} missing (no iteration finished yet)")
    # NaN from Parquet is no number to plot: treat it like JSON's null.
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
    return sorted({r["iteration"]: r for r in rows}.values(), key=lambda r: r["iteration"])


def _read_nearest(uri: str, max_pairs: int) -> list[NearestPair]:
    """The ``max_pairs`` pairs with the smallest d1 (the file is sorted so, but do not rely on it)."""
    table = storage.read_parquet(uri)
    absent = [c for c in NEAREST_COLUMNS if c not in table.column_names]
    if absent:
        raise ValueError(f"columns {absent} absent")
    rows = sorted(
        table.select(list(NEAREST_COLUMNS)).to_pylist(), key=lambda r: (r["d1"] is None, r["d1"])
    )
    return [
        NearestPair(
            gen_id=int(r["gen_id"]),
            train_id=int(r["train_id"]),
            d1=float(r["d1"]) if r["d1"] is not None else math.nan,
            d2=float(r["d2"]) if r["d2"] is not None else math.nan,
            gen_image=r["gen_image"],
            train_image=r["train_image"],
        )
        for r in rows[:max_pairs]
    ]


def _read_iteration(run: str, i: int, max_pairs: int) -> IterationData:
    item = IterationData(iteration=i)
    samples = layout.iter_path(run, i, layout.SAMPLES_PNG)
    nearest = layout.iter_path(run, i, layout.NEAREST)
    try:
        if storage.exists(samples):
            item.samples_png = _read_bytes(samples)
        else:
            item.missing.append(f"{layout.SAMPLES_PNG} missing")
    except _READ_ERRORS as exc:
        item.missing.append(f"{layout.SAMPLES_PNG} unreadable: {exc}")
    try:
        if storage.exists(nearest):
            item.nearest = _read_nearest(nearest, max_pairs)
        else:
            item.missing.append(f"{layout.NEAREST} missing")
    except _READ_ERRORS as exc:
        item.missing.append(f"{layout.NEAREST} unreadable: {exc}")
    return item


def collect_run(path: str, name: str, max_pairs: int = 8) -> RunData:
    """Read one run folder; never raises for missing or broken files (they become notes)."""
    notes: list[str] = []
    config: dict[str, Any] = {}
    config_uri = storage.join(path, layout.CONFIG)
    if storage.exists(config_uri):
        try:
            loaded = yaml.safe_load(storage.read_text(config_uri))
            config = loaded if isinstance(loaded, dict) else {}
        except _READ_ERRORS as exc:
            notes.append(f"{layout.CONFIG} unreadable: {exc}")
    else:
        notes.append(f"{layout.CONFIG} missing")
    rows = _read_rows(path, notes)
    try:
        folders = _iteration_folders(path)
    except _READ_ERRORS as exc:
        notes.append(f"cannot list iteration folders: {exc}")
        folders = []
    finished = {r["iteration"] for r in rows}
    iterations = []
    for i in sorted(set(folders) | finished):
        item = _read_iteration(path, i, max_pairs)
        if i not in finished:
            item.missing.insert(0, "no metrics row (iteration unfinished)")
        notes.extend(f"iteration {i}: {m}" for m in item.missing)
        iterations.append(item)
    run = RunData(
        name=name, path=str(path), config=config, rows=rows, iterations=iterations, notes=notes
    )
    planned = run.iterations_planned
    if planned is not None and run.iterations_finished < planned:
        notes.insert(0, f"{run.iterations_finished} of {planned} iterations finished")
    return run


def collect_runs(paths: list[str], max_pairs: int = 8) -> list[RunData]:
    """Validate then read each run; names are the folder names, made unique."""
    for path in paths:
        validate_run(path)
    return [collect_run(p, n, max_pairs) for p, n in zip(paths, unique_names(paths), strict=True)]
