"""The self-consuming loop (docs/design.md, "Layers", "Run directory"): one resumable command.

Per iteration t, five stages, each writing its outputs atomically and then a completion marker:

- ``train_set``: iteration 0 takes a seeded subset of B real images; later iterations build the set
  from the paradigm (``curation.paradigms``) and the selection (``curation.select``) in feature space
  ``features.name``;
- ``train``: Ray Train (``stages.train``), from scratch or fine-tuning the previous model;
- ``generate``: m x B candidates on Ray Data actors (``stages.generate``), seeded per sample;
- ``embed``: the pool in every feature space the run uses (``stages.embed``);
- ``metrics``: the iteration's metrics row, sample grid and most memorized pairs.

Iteration 0 first stores the real data and its embeddings (stage ``real``). Re-running the same
command resumes at the first unfinished stage; a finished run does nothing and says so.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from raycollapse.config import to_dict
from raycollapse.config.checks import check_command, feature_spaces, pool_size
from raycollapse.curation.paradigms import baseline_indices, pick_fresh_real, plan_next
from raycollapse.curation.refs import REAL_CODE, Refs
from raycollapse.curation.select import select
from raycollapse.data.sources import load_records
from raycollapse.errors import UserInputError
from raycollapse.features.weights import check_weights_available
from raycollapse.io import storage
from raycollapse.io.lock import storage_lock
from raycollapse.loop import layout, manifest
from raycollapse.loop.catalog import Catalog, origin_of, read_train_refs, real_dir
from raycollapse.loop.checks import check_real_size, check_writable
from raycollapse.loop.interrupts import call_interruptible, restore_sigint
from raycollapse.loop.layout import STAGES
from raycollapse.loop.measure import (
    iteration_metrics,
    nearest_uri,
    write_nearest,
    write_samples_png,
)
from raycollapse.loop.rundir import RunDir, config_digest
from raycollapse.metrics.paper import paper_settings
from raycollapse.seeds import derive_seed

_PURPOSE = {"subset": 1, "select": 2, "train": 3, "generate": 4}


def derived_seed(seed: int, iteration: int, purpose: str) -> int:
    """A seed for one random choice of one iteration, from the run seed alone."""
    return derive_seed(seed, iteration, _PURPOSE[purpose])


def _log(msg: str) -> None:
    print(f"[raycollapse {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Loop:
    """The state shared by the stages of one run."""

    cfg: DictConfig
    rd: RunDir
    cat: Catalog
    features: list[str]
    log: Callable[[str], None] = _log

    @property
    def run(self) -> str:
        return self.rd.path

    def path(self, t: int, *parts: str) -> str:
        return layout.iter_path(self.run, t, *parts)

    # -- stages -------------------------------------------------------------------------------
    def stage_real(self, real) -> dict[str, Any]:
        """Store the real data as Parquet and embed it in every feature space of the run."""
        from raycollapse.stages.embed import embed_pool

        storage.write_parquet_atomic(
            real.to_arrow_table(), real_dir(self.run, "data", "part-00000.parquet")
        )
        for f in self.features:
            embed_pool(
                real_dir(self.run, "data"),
                self.cat.embeddings_uri("real", f),
                self.feature_cfg(f),
                **self.embed_resources(),
            )
        return {"rows": len(real)}

    def stage_train_set(self, t: int) -> dict[str, Any]:
        cfg, loop = self.cfg, self.cfg.loop
        if t == 0:
            ids = self.cat.image_ids("real")
            rng = np.random.default_rng(derived_seed(cfg.seed, 0, "subset"))
            chosen = np.sort(rng.choice(ids, size=loop.train_size, replace=False))
            refs = Refs.of_origin("real", chosen)
        else:
            refs = self.next_train_set(t)
        # Streamed: a chunk of rows read, decoded and written at a time (never a whole pool).
        self.cat.write_train_set(refs, self.path(t, layout.TRAIN_SET, "part-00000.parquet"))
        return {"rows": len(refs)}

    def next_train_set(self, t: int) -> Refs:
        cfg, loop, sel = self.cfg, self.cfg.loop, self.cfg.select
        # Ids only (not the vectors): the sharded path never loads a pool's embeddings here;
        # references as arrays (12 bytes a candidate), not Python tuples.
        pools = [
            Refs.of_origin(origin_of(k), self.cat.ids(origin_of(k), self.features[0]))
            for k in range(t)
        ]
        plan = plan_next(
            loop.paradigm,
            train_size=loop.train_size,
            previous_train=read_train_refs(self.path(t - 1, layout.TRAIN_SET)),
            pools=pools,
            real_train=read_train_refs(self.path(0, layout.TRAIN_SET)),
            fresh_fraction=loop.fresh_fraction,
        )
        seed = derived_seed(cfg.seed + sel.seed, t, "select")
        n = plan.n_select
        if sel.method in ("none", "random") or n == len(plan.candidates):
            idx = baseline_indices(
                plan.candidates, n, seed=seed, method=sel.method, shares=loop.accumulate_baseline
            )
        elif cfg.knn.shards > 1:  # S actors, the same indices as the in-process selection
            idx = self.select_on_shards(plan.candidates, n, seed)
        else:
            x = self.cat.gather_embeddings(plan.candidates, sel_features(cfg))
            idx = select(
                x, sel.method, n, seed=seed, tau0=sel.tau0, decay=sel.decay,
                device=sel.device, backend=sel.backend,
            ).indices  # fmt: skip
        refs = Refs.concat([plan.keep, plan.candidates[np.asarray(idx, dtype=np.int64)]])
        if plan.n_fresh:
            earlier = [read_train_refs(self.path(k, layout.TRAIN_SET)) for k in range(t)]
            used = np.unique(np.concatenate([r.ids[r.codes == REAL_CODE] for r in earlier]))
            real_ids = self.cat.image_ids("real")
            fresh = pick_fresh_real(real_ids, used, plan.n_fresh, cfg.seed, t)
            refs = Refs.concat([refs, Refs.of_origin("real", fresh)])
        return refs

    def select_on_shards(self, candidates: Refs, n: int, seed: int) -> np.ndarray:
        """``select`` of ``n`` of ``candidates`` on ``knn.shards`` actors that read their own
        rows from the embedding Parquet files (whole files, or chosen rows of them where the
        candidates are not all of an origin's rows in stored order): the driver never holds the
        candidates' vectors (docs/design.md, "Distributed selection")."""
        from raycollapse.stages.select_inputs import FileRows
        from raycollapse.stages.select_shards import select_sharded

        sel = self.cfg.select
        runs = self.cat.embedding_rows(candidates, sel_features(self.cfg))
        files = [r if isinstance(r, str) else FileRows(*r) for r in runs]
        return select_sharded(
            files, sel.method, n, shards=min(int(self.cfg.knn.shards), len(candidates)),
            seed=seed, tau0=sel.tau0, decay=sel.decay,
        ).indices  # fmt: skip

    def stage_train(self, t: int) -> dict[str, Any]:
        from raycollapse.stages.train_local import run_training

        # Iteration 0 always starts from scratch; later ones fine-tune the previous model if asked.
        finetune = self.cfg.train.init == "finetune" and t > 0
        cfg = OmegaConf.merge(
            self.cfg,
            {
                "train": {
                    "seed": derived_seed(self.cfg.seed, t, "train"),
                    "init": "finetune" if finetune else "scratch",
                }
            },
        )
        init_from = self.path(t - 1, layout.MODEL) if finetune else None
        fs, base = storage.open_fs(storage.join(self.run, "ray_train"))
        storage_path = storage.join(self.run, "ray_train") if "://" in self.run else base
        return run_training(
            cfg,
            self.path(t, layout.TRAIN_SET),
            self.path(t, layout.MODEL),
            storage_path=storage_path,
            run_name=f"iter_{t:03d}",
            init_from=init_from,
        )

    def stage_generate(self, t: int) -> dict[str, Any]:
        from raycollapse.stages.generate import generate_pool

        res = self.cfg.resources
        return generate_pool(
            self.path(t, layout.MODEL),
            self.path(t, layout.POOL),
            pool_size(self.cfg),
            seed=derived_seed(self.cfg.seed, t, "generate"),
            sample_cfg=self.cfg.sample,
            iteration=t,
            actors=res.generate_actors,
            gpus_per_actor=res.generate_gpus_per_actor,
        )

    def stage_embed(self, t: int) -> dict[str, Any]:
        from raycollapse.stages.embed import embed_pool

        out: dict[str, Any] = {}
        for f in self.features:
            m = embed_pool(
                self.path(t, layout.POOL),
                self.path(t, layout.EMBEDDINGS, f),
                self.feature_cfg(f),
                **self.embed_resources(),
            )
            out[f"images_per_second_{f}"] = m["images_per_second"]
        return out

    def stage_metrics(self, t: int) -> dict[str, Any]:
        refs = read_train_refs(self.path(t, layout.TRAIN_SET))
        row = iteration_metrics(
            self.cat, t, refs, features=self.features, k=self.cfg.knn.k, eps=self.cfg.knn.eps,
            fid_available=fid_available(self.features, self.feature_cfg("inception")["pretrained"]),
            paper=paper_settings(self.cfg), shards=int(self.cfg.knn.shards),
        )  # fmt: skip
        for stage in STAGES[:-1]:
            info = self.rd.stage_info(t, stage)
            row[f"seconds_{stage}"] = info.get("seconds")
            for key in ("images_per_second",):
                if key in info:
                    row[f"{stage}_{key}"] = info[key]
        write_samples_png(self.cat, t, self.path(t, layout.SAMPLES_PNG))
        write_nearest(self.cat, t, refs, self.features[0], nearest_uri(self.run, t))
        storage.write_text_atomic(
            self.path(t, layout.ITER_METRICS), json.dumps(row, indent=1, sort_keys=True)
        )
        rows = [r for r in self.rd.metrics() if r["iteration"] != t] + [row]
        self.rd.write_metrics(rows)
        return {"row": row}

    # -- helpers ------------------------------------------------------------------------------
    def feature_cfg(self, name: str) -> dict[str, Any]:
        f = to_dict(self.cfg.features)
        if name != f["name"]:
            f["pretrained"] = None
        f["name"] = name
        return f

    def embed_resources(self) -> dict[str, Any]:
        res = self.cfg.resources
        return {
            "actors": res.embed_actors,
            "gpus_per_actor": res.embed_gpus_per_actor,
            "cpus_per_actor": res.cpus_per_actor,
        }


def sel_features(cfg: DictConfig) -> str:
    return str(cfg.features.name)


def fid_available(features: list[str], pretrained: str | None) -> bool:
    """FID needs trained Inception weights (clean-fid's file, by tag or path), not the random
    stand-in; ``pretrained`` is what the run embeds Inception with (``Loop.feature_cfg``)."""
    if "inception" not in features:
        return False
    try:
        return not check_weights_available("inception", pretrained).random
    except UserInputError:
        return False


def run_loop(
    cfg: DictConfig,
    *,
    fork: bool = False,
    until: str | None = None,
    log: Callable[[str], None] = _log,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Run (or resume) the loop of ``cfg``; returns the run folder. See the module docstring.

    ``until="ITER:STAGE"`` stops after that stage (e.g. ``1:generate``): the run stays resumable.
    ``on_iteration`` receives each iteration's metrics row, in order, once the iteration is done,
    iterations finished before a resume included (a sweep trial reports them again).

    The storage is locked for the whole call (``io.lock.storage_lock``: a second run on it is
    refused, naming the holder). On resume every finished stage's outputs are checked against
    their manifest; a damaged stage is redone. A larger ``loop.iterations`` extends a finished
    run; the run folder may have been moved or copied.
    """
    check_command(cfg, "run")
    stop_at = _parse_until(until, cfg.loop.iterations)
    if fork:
        cfg = OmegaConf.merge(
            cfg, {"loop": {"storage": f"{cfg.loop.storage}-fork-{config_digest(to_dict(cfg))}"}}
        )
    rd = RunDir(str(cfg.loop.storage))
    existed = storage.exists(rd.path)
    check_writable(rd.path)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with storage_lock(rd.path, "run"):
            return _run(cfg, rd, stop_at, log, on_iteration, sigint)
    finally:
        if not existed and not storage.exists(rd.file(layout.CONFIG)):
            rd.remove_if_empty()  # a refused new run leaves no folder behind


def _run(
    cfg: DictConfig,
    rd: RunDir,
    stop_at: tuple[int, str] | None,
    log: Callable[[str], None],
    on_iteration: Callable[[dict[str, Any]], None] | None,
    sigint: Any,
) -> str:
    if rd.saved_config() is not None:
        if rd.claim(cfg):  # refuses a changed config
            log(f"run '{rd.path}': extended to {cfg.loop.iterations} iterations")
        rows = rd.verify(cfg.loop.iterations, log)
        if len(rows) >= cfg.loop.iterations and all(
            rd.is_done(t, stage) for t in range(cfg.loop.iterations) for stage in STAGES
        ):
            log(
                f"run '{rd.path}' already finished all {cfg.loop.iterations} iterations; nothing to do."
            )
            if on_iteration is not None:
                for t in range(cfg.loop.iterations):
                    on_iteration(next(r for r in rows if r["iteration"] == t))
            return rd.path
    real = load_records(cfg.data)
    check_real_size(cfg, len(real))
    from raycollapse.stages.runtime import ensure_ray
    from raycollapse.stages.shared_storage import check_shared_storage

    ensure_ray()
    check_shared_storage(rd.path)  # multi-node with a node-local folder: refused before any write
    rd.claim(cfg)
    loop = Loop(cfg, rd, Catalog(rd.path, int(cfg.data.channels)), feature_spaces(cfg), log)
    log(
        f"run '{rd.path}': {cfg.loop.iterations} iterations, paradigm {cfg.loop.paradigm}, selection {cfg.select.method}"
    )
    _do(loop, 0, "real", lambda real=real: loop.stage_real(real), sigint)
    del real  # stored as Parquet now: the loop reads it from there, the driver need not hold it
    for t in range(cfg.loop.iterations):
        for stage in STAGES:
            fn = getattr(loop, f"stage_{stage}")
            _do(loop, t, stage, lambda t=t, fn=fn: fn(t), sigint)
            if stop_at == (t, stage):
                log(f"stopped after iteration {t} stage {stage} (--until); re-run to continue.")
                return rd.path
        # This iteration's row (on resume, later iterations may already be in the table).
        row = next(r for r in rd.metrics() if r["iteration"] == t)
        log(
            f"iteration {t}: entropy_train={_fmt(row.get('entropy_train'))} "
            f"generalization_score={_fmt(row.get('generalization_score'))} "
            f"memorized_fraction={_fmt(row.get('memorized_fraction'))}"
        )
        if on_iteration is not None:
            on_iteration(row)
    log(f"run finished: {rd.path}")
    return rd.path


def _do(loop: Loop, t: int, stage: str, fn: Callable[[], dict[str, Any]], sigint: Any) -> None:
    if loop.rd.is_done(t, stage):
        loop.log(f"iteration {t} {stage}: done before, skipped")
        return
    restore_sigint(sigint)  # should a library have taken Ctrl-C over in a stage before
    loop.log(f"iteration {t} {stage} ...")
    start = time.perf_counter()
    # Ray Train's fit() would replace the SIGINT handler: it runs in a helper thread.
    info = (call_interruptible(fn) if stage == "train" else fn()) or {}
    seconds = time.perf_counter() - start
    keep = {k: v for k, v in info.items() if isinstance(v, int | float | str | bool) or v is None}
    # The manifest goes into the marker: written after the outputs, atomically, at once.
    files = manifest.build(loop.run, t, stage)
    loop.rd.mark_done(t, stage, {**keep, "seconds": seconds, "manifest": files})
    loop.log(f"iteration {t} {stage}: {seconds:.1f} s")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _parse_until(until: str | None, iterations: int) -> tuple[int, str] | None:
    if until is None:
        return None
    it, _, stage = until.partition(":")
    if not it.isdigit() or stage not in STAGES or int(it) >= iterations:
        raise UserInputError(
            f"--until '{until}' must look like ITER:STAGE with ITER < {iterations} and STAGE one of {', '.join(STAGES)}."
        )
    return int(it), stage
