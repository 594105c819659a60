"""``raycollapse run CONFIG [key=value ...] [--dry-run]``: the self-consuming loop, resumable.

``--dry-run`` resolves and checks everything the run needs (the config, the real data and its
size, the weights of every feature space and metric, the run folder, and whether the cluster
can ever place each stage's workers), prints the resolved config and the plan, and writes
nothing: no run folder, no Ray cluster started.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from raycollapse.cli.common import config_from_args
from raycollapse.errors import UserInputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run (or resume) the recursive self-consuming loop",
        description=(
            "Run the loop of CONFIG on the current Ray cluster (a local one when none is running). "
            "Re-running the same command resumes at the first unfinished stage."
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", default=[], help="key=value overrides, e.g. loop.iterations=2"
    )
    p.add_argument(
        "--fork",
        action="store_true",
        help="the run exists with another config: start a new run beside it",
    )
    p.add_argument(
        "--until", default=None, metavar="ITER:STAGE", help="stop after this stage, e.g. 1:generate"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything the run needs, print the resolved config and the plan; do nothing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # checks every section before Ray or any data
    if args.dry_run:
        print(dry_run(cfg, fork=args.fork), end="")
        return 0
    from raycollapse.loop.runner import run_loop
    from raycollapse.tracking import make_tracker

    tracker = make_tracker(cfg, fork=args.fork)  # refuses an uninstalled MLflow / W&B first
    try:
        path = run_loop(cfg, fork=args.fork, until=args.until, on_iteration=tracker)
    finally:
        tracker.close()
    print(path)
    return 0


def dry_run(cfg: Any, *, fork: bool = False) -> str:
    """The resolved config and the plan of ``cfg`` as YAML, after every check a run makes first.

    ``cfg`` has passed ``check_command(cfg, "run")`` (values, weights). Reads the real data (to
    check B against it) and the run folder's saved config; writes nothing.
    """
    import yaml

    from raycollapse.config import to_yaml
    from raycollapse.config.plan import run_plan
    from raycollapse.data.sources import load_records
    from raycollapse.loop.checks import check_real_size

    real = load_records(cfg.data)
    check_real_size(cfg, len(real))
    plan = run_plan(cfg)
    plan["real_images"] = len(real)
    plan["run_folder"] = _storage_state(cfg, fork)
    nodes, where = _cluster_nodes()
    plan["cluster"] = where
    for stage, need in plan["resources"].items():
        _check_fits(stage, need, nodes)
    return "# resolved config\n" + to_yaml(cfg) + "# plan\n" + yaml.safe_dump(plan, sort_keys=False)


def _storage_state(cfg: Any, fork: bool) -> str:
    """What the run would do with its folder; refuses what ``run`` would refuse."""
    from raycollapse.config import to_dict
    from raycollapse.loop.rundir import RunDir, result_diff

    uri = str(cfg.loop.storage)
    saved = RunDir(uri).saved_config()
    if saved is not None:
        diff = result_diff(saved, to_dict(cfg))
        if not diff:
            return f"'{uri}' exists with this config: the run resumes at its first unfinished stage"
        if not fork:
            keys = ", ".join(k for k, _, _ in diff)
            raise UserInputError(
                f"run '{uri}' exists with a different config ({keys}); re-run with the saved config, "
                "pick another loop.storage, or pass --fork."
            )
        return f"'{uri}' exists with another config: --fork starts a new run beside it"
    if "://" not in uri:
        parent = Path(uri).absolute()
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise UserInputError(
                f"cannot create loop.storage='{uri}': '{parent}' is not writable; choose a writable folder."
            )
    return f"'{uri}' is new: the run starts there"


def _cluster_nodes() -> tuple[list[dict[str, float]], str]:
    """The alive nodes' resources: the connected Ray (or ``RAY_ADDRESS``), else this machine,
    which is what a local Ray would start with. No Ray is started."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized() or address:
        if not ray.is_initialized():
            ray.init(address=address)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        return nodes, f"the Ray cluster ({len(nodes)} node(s))"
    import torch

    cpus = float(os.cpu_count() or 1)
    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return [
        {"CPU": cpus, "GPU": gpus}
    ], f"this machine ({cpus:g} CPUs, {gpus:g} GPUs; no Ray running)"


def _check_fits(stage: str, need: dict[str, Any], nodes: list[dict[str, float]]) -> None:
    """Each worker must fit on some node, and all workers in the cluster's total."""
    count = int(need["workers"])
    for resource, key in (("GPU", "gpus_per_worker"), ("CPU", "cpus_per_worker")):
        want = float(need[key])
        if want <= 0:
            continue
        best = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        total = sum(n.get(resource, 0.0) for n in nodes)
        if want > best:
            raise UserInputError(
                f"{stage}: each worker asks for {want:g} {resource} but the largest node has {best:g}; "
                f"lower the request (resources.*, train.use_gpu / train.cpu_threads) or add bigger nodes."
            )
        if want * count > total:
            raise UserInputError(
                f"{stage}: {count} workers x {want:g} {resource} = {want * count:g} {resource}, but the "
                f"cluster has {total:g}; use fewer workers or add nodes."
            )
