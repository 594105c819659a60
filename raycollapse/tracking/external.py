"""MLflow and Weights & Biases for ``raycollapse run`` (sweeps use Ray Tune's logger callbacks).

Both are optional packages, imported only when the config asks for them. ``<run>/tracking.json``
keeps, per service, the id of the run it logs to and the iterations already logged: a resumed
run logs into the same MLflow / W&B run and sends only the iterations not yet sent.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

from raycollapse.io import storage
from raycollapse.tracking.tensorboard import IMAGE_TAG, scalars

LEDGER = "tracking.json"


class Ledger:
    """``<run>/tracking.json``: ``{service: {"run_id": str, "steps": [int, ...]}}``."""

    def __init__(self, run: str) -> None:
        self.uri = storage.join(run, LEDGER)
        self.data: dict[str, Any] = (
            json.loads(storage.read_text(self.uri)) if storage.exists(self.uri) else {}
        )

    def entry(self, service: str) -> dict[str, Any]:
        return self.data.setdefault(service, {"run_id": None, "steps": []})

    def save(self) -> None:
        storage.write_text_atomic(self.uri, json.dumps(self.data, indent=1, sort_keys=True))


def _finite(row: dict[str, Any]) -> dict[str, float]:
    # Both services refuse NaN and infinity.
    return {k: v for k, v in scalars(row).items() if math.isfinite(v)}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MLflowLogger:
    """One MLflow run per run folder, named after it; params: the flattened config."""

    def __init__(self, tracking: Any, run: str, config: dict[str, Any], ledger: Ledger) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking.mlflow_tracking_uri)
        self.ledger, self.entry = ledger, ledger.entry("mlflow")
        if self.entry["run_id"] is None:
            exp = self.client.get_experiment_by_name(tracking.mlflow_experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(tracking.mlflow_experiment)
            )
            name = run.rstrip("/").rsplit("/", 1)[-1]
            self.entry["run_id"] = self.client.create_run(exp_id, run_name=name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.entry["run_id"], params=params[i : i + 100])
            ledger.save()

    def log(self, row: dict[str, Any], png: bytes | None) -> None:
        from mlflow.entities import Metric

        step, run_id = int(row["iteration"]), self.entry["run_id"]
        if step in self.entry["steps"]:
            return
        ms = int(time.time() * 1000)
        metrics = [Metric(k, v, ms, step) for k, v in _finite(row).items()]
        self.client.log_batch(run_id, metrics=metrics)
        if png is not None:
            from PIL import Image

            with Image.open(io.BytesIO(png)) as img:
                self.client.log_image(run_id, img.copy(), f"{IMAGE_TAG}/iter_{step:03d}.png")
        self.entry["steps"].append(step)
        self.ledger.save()

    def close(self) -> None:
        self.client.set_terminated(self.entry["run_id"])


class WandbLogger:
    """One W&B run per run folder (resumed by its id); config: the run's config."""

    def __init__(self, tracking: Any, run: str, config: dict[str, Any], ledger: Ledger) -> None:
        import wandb

        self.wandb = wandb
        self.ledger, self.entry = ledger, ledger.entry("wandb")
        if self.entry["run_id"] is None:
            self.entry["run_id"] = wandb.util.generate_id()
            ledger.save()
        self.run = wandb.init(
            project=tracking.wandb_project,
            id=self.entry["run_id"],
            resume="allow",
            name=run.rstrip("/").rsplit("/", 1)[-1],
            config=config,
            mode=tracking.wandb_mode,
        )

    def log(self, row: dict[str, Any], png: bytes | None) -> None:
        step = int(row["iteration"])
        if step in self.entry["steps"]:
            return
        data: dict[str, Any] = dict(_finite(row))
        if png is not None:
            from PIL import Image

            with Image.open(io.BytesIO(png)) as img:
                data[IMAGE_TAG] = self.wandb.Image(img.copy())
        self.run.log(data, step=step)
        self.entry["steps"].append(step)
        self.ledger.save()

    def close(self) -> None:
        self.run.finish()
