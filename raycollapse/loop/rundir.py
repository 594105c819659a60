"""A run directory: its saved config, stage completion markers and the metrics table.

Resume works by markers: a stage writes its outputs atomically, then its marker, which holds the
manifest of those outputs (``loop.manifest``); re-running the same command skips every stage
whose marker exists and whose outputs still match their manifest. A changed config for an
existing run is refused with the differing keys, unless the user forks it into a new run; two
changes are not changes: the storage path (a run can be copied or moved) and a larger
``loop.iterations`` (the run is extended).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import yaml
from omegaconf import DictConfig

from raycollapse.config import Config, diff_configs, to_dict, to_yaml
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.loop import layout
from raycollapse.loop.manifest import remove_outputs, verify

# Keys that may change between invocations of the same run without changing its results
# (loop.storage: a run folder may be moved or copied and resumed there).
NON_RESULT_KEYS = (
    "resources.", "knn.batch_size", "features.batch_size", "sample.batch_size", "loop.storage",
    "tracking.", "select.device", "select.backend", "knn.device", "knn.backend",
    "train.launcher",
)  # fmt: skip


def result_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences between two configs that would change a run's results."""
    return [d for d in diff_configs(saved, new) if not d[0].startswith(NON_RESULT_KEYS)]


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with every key it lacks taken from ``defaults``, at any depth: a run saved before
    a config key existed ran with that key's default (keys are only added with the old
    behaviour as their default), so it is not a change of config."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = with_defaults(out[key], value)
    return out


def config_digest(cfg: dict[str, Any]) -> str:
    """A short hash of the result-relevant config (names a forked run)."""
    relevant = {k: v for k, v in cfg.items() if k != "resources"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :8
    ]


@dataclass
class RunDir:
    """The folder (local path or URI) of one run."""

    path: str

    def file(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    # -- config ---------------------------------------------------------------------------
    def saved_config(self) -> dict[str, Any] | None:
        """The run's ``config.yaml``; None for a new run. A damaged one is a ``UserInputError``."""
        uri = self.file(layout.CONFIG)
        if not storage.exists(uri):
            return None
        try:
            saved = yaml.safe_load(storage.read_text(uri))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            saved = exc
        if not isinstance(saved, dict):
            raise UserInputError(
                f"'{uri}' is damaged (not a YAML mapping: {saved!s:.200}); restore it from a copy "
                "of the run, or start the run again in an empty loop.storage."
            )
        return saved

    def claim(self, cfg: DictConfig) -> bool:
        """Save ``cfg`` in a new run, or check it equals the config of an existing one; True when
        the run is extended (a larger ``loop.iterations``: the saved config is updated)."""
        saved = self.saved_config()
        new = to_dict(cfg)
        if saved is None:
            storage.write_text_atomic(self.file(layout.CONFIG), to_yaml(cfg))
            return False
        diff = result_diff(with_defaults(saved, to_dict(None, Config)), new)
        grows = [d for d in diff if d[0] == "loop.iterations" and int(d[2]) > int(d[1] or 0)]
        diff = [d for d in diff if d not in grows]
        if diff:
            lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in diff)
            raise UserInputError(
                f"run '{self.path}' exists with a different config:\n{lines}\n"
                "Re-run with the saved config to resume it, pick another loop.storage, "
                "or pass --fork to start a new run from this config beside it."
            )
        if grows:
            storage.write_text_atomic(self.file(layout.CONFIG), to_yaml(cfg))
        return bool(grows)

    # -- markers --------------------------------------------------------------------------
    def is_done(self, iteration: int, stage: str) -> bool:
        return storage.exists(layout.done_marker(self.path, iteration, stage))

    def mark_done(self, iteration: int, stage: str, info: dict[str, Any] | None = None) -> None:
        storage.write_text_atomic(
            layout.done_marker(self.path, iteration, stage), json.dumps(info or {}, sort_keys=True)
        )

    def stage_info(self, iteration: int, stage: str) -> dict[str, Any]:
        """The marker's content (timings, ``manifest``); ``{}`` for an unreadable marker."""
        try:
            info = json.loads(storage.read_text(layout.done_marker(self.path, iteration, stage)))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    def check_stage(self, iteration: int, stage: str) -> str | None:
        """None when a finished stage's outputs match the manifest in its marker; else why not
        (a sentence naming the file). A marker without a manifest (damaged) fails."""
        manifest = self.stage_info(iteration, stage).get("manifest")
        if not isinstance(manifest, dict):
            marker = layout.done_marker(self.path, iteration, stage)
            return f"its completion marker '{marker}' holds no manifest (damaged or too old)"
        return verify(self.path, manifest)

    def undo(self, iteration: int, stage: str) -> None:
        """Make a finished stage unfinished: its marker, then its outputs, are removed."""
        fs, path = storage.open_fs(layout.done_marker(self.path, iteration, stage))
        fs.delete_file(path)
        remove_outputs(self.path, iteration, stage)

    # -- metrics --------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.json`` ([] before the first); damaged: ``UserInputError``."""
        uri = self.file(layout.METRICS_JSON)
        if not storage.exists(uri):
            return []
        try:
            rows = json.loads(storage.read_text(uri))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            rows = exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "iteration" in r
                                                 for r in rows):  # fmt: skip
            raise UserInputError(
                f"'{uri}' is damaged ({rows!s:.200}); re-run the same `raycollapse run` command: "
                "it rebuilds the table from the iterations' own metrics.json files."
            )
        return rows

    def rebuild_metrics(self, iterations: list[int]) -> None:
        """Write the run's table again from the per-iteration rows of ``iterations``."""
        rows = [json.loads(storage.read_text(layout.iter_path(self.path, t, layout.ITER_METRICS)))
                for t in iterations]  # fmt: skip
        self.write_metrics(rows)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """The run's table: ``metrics.json`` (list of rows) and ``metrics.parquet``."""
        rows = sorted(rows, key=lambda r: r["iteration"])
        storage.write_text_atomic(
            self.file(layout.METRICS_JSON), json.dumps(rows, indent=1, sort_keys=True)
        )
        keys = sorted({k for r in rows for k in r})
        table = pa.table({k: [r.get(k) for r in rows] for k in keys})
        storage.write_parquet_atomic(table, self.file(layout.METRICS_PARQUET))

    # -- resume -----------------------------------------------------------------------------
    def verify(self, iterations: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
        """Check every finished stage against its manifest (``loop.manifest``); a stage whose
        outputs are missing, truncated or changed is made unfinished (its outputs removed) so
        that the run redoes it from its inputs. Returns the metrics table, rebuilt from the
        iterations' own rows when it is damaged or lacks one of them."""
        stages = [(0, "real"), *((t, s) for t in range(iterations) for s in layout.STAGES)]
        for t, stage in stages:
            if self.is_done(t, stage):
                problem = self.check_stage(t, stage)
                if problem is not None:
                    log(f"iteration {t} {stage}: {problem}; it is done again")
                    self.undo(t, stage)
        finished = [t for t in range(iterations) if self.is_done(t, "metrics")]
        try:
            rows = self.metrics()
        except UserInputError as exc:
            log(f"{exc} Rebuilding it.")
            rows = []
        if {r["iteration"] for r in rows} != set(finished):
            self.rebuild_metrics(finished)
            rows = self.metrics()
        return rows

    def remove_if_empty(self) -> None:
        """Remove a local run folder that holds nothing (hidden leftovers of a lock or probe
        aside): a refused new run leaves no folder behind."""
        path = self.path
        if "://" in path or not os.path.isdir(path):
            return
        if all(name.startswith(".") and os.path.isfile(os.path.join(path, name))
               for name in os.listdir(path)):  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
