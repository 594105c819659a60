"""The Ray Tune layer of a sweep: trainables, resources, scheduler, resume, results.

Resources (Ray Train V2 inside Tune): a loop trial's process only drives the loop; its Ray Train
run reserves its own placement group and its Ray Data stages their own actors, outside the
trial's placement group. So a trial reserves its process only (``resources``), and the sweep
limits ``max_concurrent_trials`` so that the trials running at once fit the cluster with the
most their stages ask for at a time (training workers, generation or embedding actors): started
trials never wait on each other's resources. Select trials compute in their process: they
reserve what they use.

Resume: Tune's experiment state lives in ``<storage>/tune``; re-running the same command
restores it (``Tuner.restore``): finished trials are kept, unfinished and errored ones start
again, and a loop trial starting again resumes its run folder (``<storage>/trials/<id>``).
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Any

import numpy as np
import ray
from omegaconf import OmegaConf
from ray import tune

from raycollapse.config import Config, to_dict
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.lock import storage_lock
from raycollapse.loop.rundir import RunDir
from raycollapse.sweeps import results as res
from raycollapse.sweeps.config import SELECT_METRICS, Sweep, sweep_yaml, with_values
from raycollapse.sweeps.space import VARIANT_PARAM, SearchSpace
from raycollapse.sweeps.trials import objective_value, run_loop_trial, select_trial

TUNE_DIR = "tune"
TRIALS_DIR = "trials"


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The Tune ``param_space`` of a search space (randint's high is included)."""
    make = {
        "value": lambda v: v[0],
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(v[0], v[1]),
        "loguniform": lambda v: tune.loguniform(v[0], v[1]),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),
    }
    out = {d.key: make[d.kind](d.values) for d in space.dimensions}
    if space.variants:
        out[VARIANT_PARAM] = tune.grid_search(list(range(len(space.variants))))
    return out


def trial_dir(root: str, trial_id: str) -> str:
    """The folder of one trial's own outputs (a loop trial's run folder)."""
    return storage.join(root, TRIALS_DIR, trial_id)


def trial_config(sweep: Sweep, values: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """A trial's full loop config as plain data; a loop trial runs in its own run folder."""
    cfg = sweep.trial_config(values)
    if sweep.cfg.kind == "loop":
        cfg = with_values(cfg, {"loop.storage": trial_dir(sweep.storage, trial_id)}, "trial")
    return to_dict(cfg)


def _structured(plain: dict[str, Any]):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), plain)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _trial_log(trial_id: str):
    def log(msg: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')} {trial_id}] {msg}", file=sys.stderr, flush=True)

    return log


def _select_trainable(config: dict[str, Any], *, sweep: Sweep, pool: np.ndarray) -> None:
    trial_id = tune.get_context().get_trial_id()
    cfg = _structured(trial_config(sweep, sweep.space.values_for(config), trial_id))
    idx, metrics = select_trial(pool, cfg)
    buf = io.BytesIO()
    np.save(buf, idx)
    storage.write_bytes_atomic(
        storage.join(trial_dir(sweep.storage, trial_id), "selection.npy"), buf.getvalue()
    )
    objective = objective_value([metrics[sweep.cfg.objective.metric]], sweep.cfg.objective.reduce)
    tune.report({"iteration": 0, **metrics, "objective": objective})


def _loop_trainable(config: dict[str, Any], *, sweep: Sweep, launch_dir: str) -> None:
    # Tune starts a trial in its own folder; relative paths of the loop config (data.path,
    # weights) mean the folder the sweep was started from.
    if os.path.isdir(launch_dir):
        os.chdir(launch_dir)
    trial_id = tune.get_context().get_trial_id()
    cfg = _structured(trial_config(sweep, sweep.space.values_for(config), trial_id))
    metric, reduce = sweep.cfg.objective.metric, sweep.cfg.objective.reduce
    seen: list[float | None] = []

    def report(row: dict[str, Any]) -> None:
        seen.append(row.get(metric))
        tune.report({**row, "objective": objective_value(seen, reduce)})

    run_loop_trial(cfg, report, _trial_log(trial_id))


def stage_peak(cfg: Any) -> tuple[float, float]:
    """The most (CPUs, GPUs) a loop config's stages hold at once: training workers, generation
    actors or embedding actors (one stage runs at a time)."""
    tr, r = cfg.train, cfg.resources
    train = (tr.workers * float(tr.cpu_threads or 1), tr.workers * (1.0 if tr.use_gpu else 0.0))
    gen = (r.generate_actors * r.cpus_per_actor, r.generate_actors * r.generate_gpus_per_actor)
    emb = (r.embed_actors * r.cpus_per_actor, r.embed_actors * r.embed_gpus_per_actor)
    return max(train[0], gen[0], emb[0]), max(train[1], gen[1], emb[1])


def trial_resources(sweep: Sweep) -> tuple[float, float]:
    """(CPUs, GPUs) the trial's own process reserves."""
    cpu = sweep.cfg.resources.cpu
    if cpu is None:
        cpu = 1.0 if sweep.cfg.kind == "select" else 0.0
    return float(cpu), float(sweep.cfg.resources.gpu)


def max_concurrent(sweep: Sweep, configs: list[Any], cluster: dict[str, float]) -> int | None:
    """How many trials may run at once: ``max_concurrent_trials``, checked to fit ``cluster``
    (loop trials), or the most that fit when it is null (None: Tune's default, select trials)."""
    asked = sweep.cfg.max_concurrent_trials
    if sweep.cfg.kind == "select":
        return asked
    own_cpu, own_gpu = trial_resources(sweep)
    peaks = [stage_peak(c) for c in configs]
    need = {"CPU": own_cpu + max(p[0] for p in peaks), "GPU": own_gpu + max(p[1] for p in peaks)}
    fits = min(
        (math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0),
        default=asked or 1,
    )
    if fits < 1:
        raise UserInputError(
            f"one loop trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU at once (its process "
            f"and its largest stage) but the cluster has {cluster.get('CPU', 0):g} CPU and "
            f"{cluster.get('GPU', 0):g} GPU; lower train.workers / resources.*_actors or add nodes."
        )
    if asked is not None and asked > fits:
        raise UserInputError(
            f"max_concurrent_trials={asked}, but only {fits} loop trials fit the cluster at once "
            f"(each needs {need['CPU']:g} CPU, {need['GPU']:g} GPU); lower max_concurrent_trials."
        )
    return asked or fits


class _Progress(tune.Callback):
    """One line per reported iteration and per ended trial, on stderr."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def _say(self, msg: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._say(
            f"trial {trial.trial_id} iteration {result.get('iteration')}: "
            f"{self.metric}={result.get(self.metric)} objective={result.get('objective')}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} ended")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} failed: {trial.error_file}")


def logger_callbacks(sweep: Sweep) -> list[tune.Callback]:
    """Ray Tune's own logger callbacks for the base config's ``tracking`` section: TensorBoard
    (``<storage>/tune/<trial>/``, every reported value per iteration), MLflow (one run per
    trial) and Weights & Biases. Loop trials also write TensorBoard files with their sample
    grids into their run folders (``raycollapse.tracking``)."""
    t = sweep.base.tracking
    out: list[tune.Callback] = []
    if t.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if t.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(
            MLflowLoggerCallback(
                tracking_uri=t.mlflow_tracking_uri, experiment_name=t.mlflow_experiment
            )
        )
    if t.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        kwargs = {"mode": t.wandb_mode} if t.wandb_mode else {}
        out.append(WandbLoggerCallback(project=t.wandb_project, **kwargs))
    return out


def _check_resume(root: str, sweep: Sweep) -> None:
    uri = storage.join(root, res.SWEEP_YAML)
    saved = storage.read_text(uri) if storage.exists(uri) else None
    if saved is not None and saved != sweep_yaml(sweep):
        raise UserInputError(
            f"the sweep in '{root}' was started with another sweep config or base config "
            f"(saved in {uri}); re-run it unchanged to resume, or choose another storage."
        )
    storage.write_text_atomic(uri, sweep_yaml(sweep))


def run_sweep(sweep: Sweep, configs: list[Any], pool: np.ndarray | None) -> dict[str, Any]:
    """Run (or resume) the sweep on the connected Ray cluster; write the results; return the
    summary (see :func:`raycollapse.sweeps.results.write_results`).

    ``configs``: every loop config a trial can get (for the resource check); ``pool``: the
    select trials' embeddings.
    """
    concurrency = max_concurrent(sweep, configs, ray.cluster_resources())
    # A second sweep (or run) on the same storage is refused, naming the holder; trials lock
    # their own run folders (<storage>/trials/<id>), so they do not conflict with this lock.
    with storage_lock(sweep.storage, "sweep"):
        return _run_sweep(sweep, configs, pool, concurrency)


def _run_sweep(
    sweep: Sweep, configs: list[Any], pool: np.ndarray | None, concurrency: int | None
) -> dict[str, Any]:
    root = sweep.storage
    c = sweep.cfg
    _check_resume(root, sweep)
    if c.kind == "select":
        fn = tune.with_parameters(_select_trainable, sweep=sweep, pool=pool)
    else:
        fn = tune.with_parameters(_loop_trainable, sweep=sweep, launch_dir=os.getcwd())
    cpu, gpu = trial_resources(sweep)
    # A bundle of only zeros is refused; one byte of memory lets a driver-only trial reserve
    # no CPU, so that the CPUs stay free for its training workers and stage actors.
    trainable = tune.with_resources(fn, {"cpu": cpu, "gpu": gpu, "memory": 0 if cpu or gpu else 1})
    exp = storage.join(root, TUNE_DIR)
    if tune.Tuner.can_restore(exp):
        tuner = tune.Tuner.restore(exp, trainable=trainable, restart_errored=True)
    else:
        max_t = max(int(cfg.loop.iterations) for cfg in configs)
        scheduler = None
        if c.kind == "loop" and c.scheduler.name == "asha":
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_t,
                grace_period=int(c.scheduler.grace_period),
                reduction_factor=float(c.scheduler.reduction_factor),
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep.space),
            tune_config=tune.TuneConfig(
                metric="objective",
                mode=str(c.objective.mode),
                scheduler=scheduler,
                # The variant generator limits concurrency itself (Tune ignores
                # max_concurrent_trials when given a search algorithm instance).
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=int(c.seed), max_concurrent=concurrency or 0
                ),
                num_samples=int(c.num_samples),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                storage_path=root,
                name=TUNE_DIR,
                verbose=0,
                callbacks=[_Progress(c.objective.metric), *logger_callbacks(sweep)],
            ),
        )
    grid = tuner.fit()
    records = [_record(sweep, r) for r in grid]
    records.sort(key=lambda r: r.trial_id)
    summary = res.write_results(records, sweep.space.keys(), str(c.objective.mode), root)
    from raycollapse.report.sweep import build_sweep_report

    summary["report"] = build_sweep_report(root)
    return summary


def _record(sweep: Sweep, result: Any) -> res.TrialRecord:
    trial_id = os.path.basename(str(result.path).rstrip("/"))
    values = sweep.space.values_for(result.config)
    config = trial_config(sweep, values, trial_id)
    rec = res.TrialRecord(trial_id, values, config)
    if sweep.cfg.kind == "select":
        m = result.metrics or {}
        if "objective" in m:
            keep = ("iteration", *SELECT_METRICS, "objective")
            rec.rows = [{k: m.get(k) for k in keep}]
    else:
        # The run folder holds every finished iteration: the truth even for a trial that Tune
        # started again after an interruption (and so reported some iterations twice).
        rows = RunDir(config["loop"]["storage"]).metrics()
        seen: list[float | None] = []
        for row in rows:
            seen.append(row.get(sweep.cfg.objective.metric))
            rec.rows.append({**row, "objective": objective_value(seen, sweep.cfg.objective.reduce)})
    if result.error is not None:
        rec.status, rec.error = "errored", str(result.error).splitlines()[0]
    elif sweep.cfg.kind == "select" or len(rec.rows) >= int(config["loop"]["iterations"]):
        rec.status = "finished" if rec.rows else "errored"
    else:
        rec.status = "stopped_early"
    return rec
