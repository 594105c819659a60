"""The plan of a loop run, from its config alone: what ``raycollapse run --dry-run`` prints.

Per iteration: the training set's size and where it comes from, the candidates the selection
sees, the pool generated; per stage: the workers and what each asks Ray for. Sizes follow
docs/design.md, "Paradigms" (``curation.paradigms.plan_next``).
"""

from __future__ import annotations

from typing import Any

from raycollapse.config.checks import feature_spaces, pool_size
from raycollapse.config.schema import Config
from raycollapse.curation.paradigms import fresh_count

__all__ = ["run_plan", "stage_resources"]


def stage_resources(cfg: Config) -> dict[str, dict[str, Any]]:
    """Workers and per-worker Ray resources of the stages that run on the cluster."""
    res, tc = cfg.resources, cfg.train
    return {
        "train": {
            "workers": int(tc.workers),
            "cpus_per_worker": float(tc.cpu_threads or 1),
            "gpus_per_worker": 1.0 if tc.use_gpu else 0.0,
        },
        "generate": {
            "workers": int(res.generate_actors),
            "cpus_per_worker": float(res.cpus_per_actor),
            "gpus_per_worker": float(res.generate_gpus_per_actor),
        },
        "embed": {
            "workers": int(res.embed_actors),
            "cpus_per_worker": float(res.cpus_per_actor),
            "gpus_per_worker": float(res.embed_gpus_per_actor),
        },
    }


def _iteration(cfg: Config, t: int) -> dict[str, Any]:
    loop, b, pool = cfg.loop, int(cfg.loop.train_size), pool_size(cfg)
    if t == 0:
        return {"iteration": 0, "train_set": f"{b} real images (seeded subset)", "candidates": 0,
                "train_size": b, "pool": pool}  # fmt: skip
    method = str(cfg.select.method)
    if loop.paradigm == "replace":
        cands, size, how = pool, b, f"{method} selection of {b} from the last pool"
    elif loop.paradigm == "accumulate":
        cands, size = b + t * pool, b
        how = f"{method} selection of {b} from the real set and {t} pool(s)"
        if method == "none" and loop.accumulate_baseline == "per_generation":
            how = f"{b // (t + 1) + 1} from each of {t + 1} origins (per_generation), cut to {b}"
    elif loop.paradigm == "accumulate_all":
        cands, size = pool, b * (t + 1)
        how = f"the previous set plus a {method} selection of {b} from the last pool"
    else:
        n_fresh = fresh_count(b, float(loop.fresh_fraction))
        cands, size = pool, b
        how = f"{n_fresh} fresh real images plus a {method} selection of {b - n_fresh} from the last pool"
    return {"iteration": t, "train_set": how, "candidates": cands, "train_size": size, "pool": pool}


def run_plan(cfg: Config) -> dict[str, Any]:
    """The plan of the run ``cfg`` (plain data, no I/O)."""
    extra = [
        name
        for name, on in (
            ("generalization_score_paper", cfg.metrics.paper_generalization),
            ("fid_torchvision", cfg.metrics.fid_torchvision),
        )
        if on
    ]
    return {
        "storage": str(cfg.loop.storage),
        "iterations": int(cfg.loop.iterations),
        "stages": ["train_set", "train", "generate", "embed", "metrics"],
        "paradigm": str(cfg.loop.paradigm),
        "selection": str(cfg.select.method),
        "selection_features": str(cfg.features.name),
        "feature_spaces": feature_spaces(cfg),
        "train_steps_per_iteration": int(cfg.train.steps),
        "sampler": f"{cfg.sample.sampler} ({cfg.diffusion.num_train_timesteps} steps)"
        if cfg.sample.sampler == "ddpm"
        else f"ddim ({cfg.sample.steps} steps, eta {cfg.sample.eta})",
        "resources": stage_resources(cfg),
        "paper_metrics": extra,
        "per_iteration": [_iteration(cfg, t) for t in range(int(cfg.loop.iterations))],
    }
