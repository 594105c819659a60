"""A run directory: its saved config, stage completion markers and the metrics table.

Resume works by markers: a stage writes its outputs atomically, then its marker; re-running the
same command skips every stage whose marker exists. A changed config for an existing run is refused
with the differing keys, unless the user forks it into a new run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import yaml
from omegaconf import DictConfig

from raycollapse.config import diff_configs, to_dict, to_yaml
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.loop import layout

# Keys that may change between invocations of the same run without changing its results.
NON_RESULT_KEYS = ("resources.", "knn.batch_size", "features.batch_size", "sample.batch_size")


def result_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differences between two configs that would change a run's results."""
    return [d for d in diff_configs(saved, new) if not d[0].startswith(NON_RESULT_KEYS)]


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
        uri = self.file(layout.CONFIG)
        if not storage.exists(uri):
            return None
        return yaml.safe_load(storage.read_text(uri))

    def claim(self, cfg: DictConfig) -> None:
        """Save ``cfg`` in a new run, or check it equals the config of an existing one."""
        saved = self.saved_config()
        new = to_dict(cfg)
        if saved is None:
            storage.write_text_atomic(self.file(layout.CONFIG), to_yaml(cfg))
            return
        diff = result_diff(saved, new)
        if diff:
            lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in diff)
            raise UserInputError(
                f"run '{self.path}' exists with a different config:\n{lines}\n"
                "Re-run with the saved config to resume it, pick another loop.storage, "
                "or pass --fork to start a new run from this config beside it."
            )

    # -- markers --------------------------------------------------------------------------
    def is_done(self, iteration: int, stage: str) -> bool:
        return storage.exists(layout.done_marker(self.path, iteration, stage))

    def mark_done(self, iteration: int, stage: str, info: dict[str, Any] | None = None) -> None:
        storage.write_text_atomic(
            layout.done_marker(self.path, iteration, stage), json.dumps(info or {}, sort_keys=True)
        )

    def stage_info(self, iteration: int, stage: str) -> dict[str, Any]:
        return json.loads(storage.read_text(layout.done_marker(self.path, iteration, stage)))

    # -- metrics --------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        uri = self.file(layout.METRICS_JSON)
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else []

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """The run's table: ``metrics.json`` (list of rows) and ``metrics.parquet``."""
        rows = sorted(rows, key=lambda r: r["iteration"])
        storage.write_text_atomic(
            self.file(layout.METRICS_JSON), json.dumps(rows, indent=1, sort_keys=True)
        )
        keys = sorted({k for r in rows for k in r})
        table = pa.table({k: [r.get(k) for r in rows] for k in keys})
        storage.write_parquet_atomic(table, self.file(layout.METRICS_PARQUET))
