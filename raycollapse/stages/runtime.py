"""Connecting to Ray: attach to a running cluster when there is one, else start a local Ray."""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Make sure this process is connected to Ray.

    - already connected (a test fixture, a notebook, the loop): do nothing;
    - ``RAY_ADDRESS`` set: connect there (``ray job submit`` and KubeRay set it);
    - a cluster started with ``ray start`` on this machine: attach to it (``address="auto"``);
    - otherwise: start a local Ray on this machine's CPUs/GPUs, without the dashboard (it costs
      a process and a port, and a local one-off run has no one to look at it).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        # "auto" raises ConnectionError when no cluster is running here: start a local one.
        ray.init(include_dashboard=False)
