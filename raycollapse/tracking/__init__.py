"""Experiment tracking of loop runs: TensorBoard by default, MLflow and Weights & Biases on request.

:func:`make_tracker` returns the callback that ``run_loop(cfg, on_iteration=...)`` calls with
each finished iteration's metrics row (resumed ones included); it logs the row and the
iteration's sample grid to what ``cfg.tracking`` asks for (docs in ``config/schema.py``,
``TrackingConfig``):

- TensorBoard: ``<run>/tensorboard/`` (:mod:`raycollapse.tracking.tensorboard`), so that
  ``tensorboard --logdir runs/`` shows every run;
- MLflow, W&B: :mod:`raycollapse.tracking.external` (optional packages).

No Ray here. Sweeps track through Ray Tune's logger callbacks (``sweeps.tuner``) and use this
for each loop trial's TensorBoard files only.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.loop import layout
from raycollapse.tracking import tensorboard

# Config key -> (module imported, pip package that provides it).
PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_tracking(tracking: Any) -> None:
    """Refuse a tracking service that is asked for but not installed (before any work)."""
    for key, (module, package) in PACKAGES.items():
        if getattr(tracking, key) and importlib.util.find_spec(module) is None:
            raise UserInputError(
                f"tracking.{key}=true but {module} is not installed: `pip install {package}`, "
                f"or set tracking.{key}=false."
            )


def run_folder(cfg: DictConfig, fork: bool = False) -> str:
    """The run folder ``run_loop(cfg, fork=fork)`` writes (a fork: beside ``loop.storage``)."""
    from raycollapse.config import to_dict
    from raycollapse.loop.rundir import config_digest

    storage_ = str(cfg.loop.storage)
    return f"{storage_}-fork-{config_digest(to_dict(cfg))}" if fork else storage_


def _read_bytes(uri: str) -> bytes:
    fs, path = storage.open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


class Tracker:
    """The ``on_iteration`` callback of one run; call :meth:`close` when the run returns."""

    def __init__(self, cfg: DictConfig, run: str, external: bool) -> None:
        self.cfg, self.run, self.external = cfg, run, external
        self._loggers: list[Any] | None = None  # MLflow / W&B, opened at the first row

    def _open(self) -> list[Any]:
        from raycollapse.config import to_dict
        from raycollapse.tracking.external import Ledger, MLflowLogger, WandbLogger

        t, loggers = self.cfg.tracking, []
        if self.external and (t.mlflow or t.wandb):
            ledger, config = Ledger(self.run), to_dict(self.cfg)
            if t.mlflow:
                loggers.append(MLflowLogger(t, self.run, config, ledger))
            if t.wandb:
                loggers.append(WandbLogger(t, self.run, config, ledger))
        return loggers

    def __call__(self, row: dict[str, Any]) -> None:
        """Log one finished iteration's metrics row (and its ``samples.png``, when present)."""
        png_uri = layout.iter_path(self.run, int(row["iteration"]), layout.SAMPLES_PNG)
        png = _read_bytes(png_uri) if storage.exists(png_uri) else None
        if self.cfg.tracking.tensorboard:
            tensorboard.log_iteration(self.run, row, png)
        if self._loggers is None:
            self._loggers = self._open()
        for logger in self._loggers:
            logger.log(row, png)

    def close(self) -> None:
        """End the MLflow / W&B runs opened (TensorBoard files are complete when written)."""
        for logger in self._loggers or []:
            logger.close()
        self._loggers = None


def make_tracker(cfg: DictConfig, *, fork: bool = False, external: bool = True) -> Tracker:
    """The tracker of the run ``run_loop(cfg, fork=fork)`` runs; checks that the services
    ``cfg.tracking`` asks for are installed (``UserInputError`` naming the pip package).
    ``external=False``: TensorBoard only (a sweep's loop trial: Ray Tune logs to MLflow / W&B).
    """
    if external:
        check_tracking(cfg.tracking)
    return Tracker(cfg, run_folder(cfg, fork), external)


__all__ = ["Tracker", "check_tracking", "make_tracker", "run_folder"]
