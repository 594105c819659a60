"""Shared fixtures. One local Ray per pytest session (per xdist worker), started on first use and reused.

A multi-node test (``ray_cluster``) shuts the local Ray down and starts a
``ray.cluster_utils.Cluster``; the next test that asks for ``ray_local`` starts a local one again.
References and builders shared by several test files live in ``tests/helpers.py``.
"""

from __future__ import annotations

import pytest
from helpers import start_local_ray


@pytest.fixture
def ray_local():
    return start_local_ray()


@pytest.fixture
def ray_cluster():
    """Three simulated nodes (head + 2 workers), each with 1 CPU and a logical GPU."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 1, "object_store_memory": 300_000_000},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=300_000_000)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def pytest_collection_modifyitems(config, items):
    """Every multi-node test is slow: starting three Ray nodes alone takes tens of seconds.

    The test files that hold a slow test run first (each file's tests stay together and in
    order, so module fixtures are built once): with two xdist workers, a two-minute test that
    starts last would leave one worker idle for its length at the end of the run."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept within


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
