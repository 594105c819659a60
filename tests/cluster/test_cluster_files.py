"""The cluster files: launcher YAMLs against Ray's own cluster-config schema, KubeRay manifests
against the RayCluster/RayJob CRD schemas (vendored in kuberay_schema.json, see its "source"),
and the rules every file keeps: the installed Ray version in every image, no placeholder, no
public dashboard. Each validator is also shown a broken copy, which it must refuse."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
RAY_TAG = f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_cluster_file_is_checked():
    """A new file in cluster/ must be added to a check here."""
    assert {p.name for p in CLUSTER.iterdir()} == {*LAUNCHERS, *KUBERAY, "kuberay-storage.yaml"}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_validates_with_rays_schema(name):
    config = _load(name)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks first
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert [(w["min_workers"], w["max_workers"]) for w in workers] == [(0, 8)]  # autoscaled
    docker = config["docker"]
    assert docker["head_image"] == f"rayproject/ray:{RAY_TAG}-cpu"
    assert docker["worker_image"] == f"rayproject/ray:{RAY_TAG}-gpu"
    # installs from the checkout it syncs, and swaps in the GPU build of FAISS
    (target,) = [t for t, src in config["file_mounts"].items() if src == "."]
    setup = " ".join(config["setup_commands"])
    assert f"pip install --quiet {target} " in setup and "faiss-gpu-cu12" in setup
    # the dashboard listens on the head's loopback (reached through `ray dashboard`'s tunnel)
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # typo
        lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}),
        lambda c: c.update(setup_comands=[]),  # typo of a top-level key
        lambda c: c["docker"].update(worker_img="x"),
        lambda c: c.pop("provider"),
    ],
)
def test_rays_schema_refuses_a_broken_launcher(breakage):
    config = _load("aws.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, KeyError)):
        validate_config(prepare_config(config))


def _kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    vendored = json.loads((Path(__file__).with_name("kuberay_schema.json")).read_text())
    assert vendored["source"].startswith("KubeRay v1.")
    return jsonschema.Draft202012Validator({**vendored["kinds"][kind], "$defs": vendored["$defs"]})


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_manifest_validates_against_the_crd(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[name]
    errors = list(_kuberay_validator(doc["kind"]).iter_errors(doc["spec"]))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    groups = [head, *cluster["workerGroupSpecs"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for group in groups:  # every pod runs the image the Dockerfile builds, with the run volume
        (container,) = group["template"]["spec"]["containers"]
        assert f"docker build -t {container['image']} ." in dockerfile
        assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/mnt/runs"}]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8) and cluster["enableInTreeAutoscaling"]
    claim = _load("kuberay-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    assert (
        head["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        == claim["metadata"]["name"]
    )


@pytest.mark.parametrize(
    "path, value",
    [
        (["headGroupSpec", "rayStartParam"], {}),  # typo: unknown field
        (["workerGroupSpecs", 0, "maxReplicas"], "8"),  # wrong type
        (["headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicy"], 3),
        (["workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"], {}),
    ],
)
def test_crd_schema_refuses_a_broken_manifest(path, value):
    for name, kind in KUBERAY.items():
        spec = _load(name)["spec"]
        node = spec.get("rayClusterSpec", spec)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert list(_kuberay_validator(kind).iter_errors(spec)), (name, path)
    bad_job = _load("kuberay-rayjob.yaml")["spec"]
    bad_job["shutdownAfterJobFinish"] = True  # typo of a RayJob field
    assert list(_kuberay_validator("RayJob").iter_errors(bad_job))


def test_dockerfile_and_no_placeholders():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_TAG)}-gpu$", dockerfile, re.M)
    assert "faiss-gpu-cu12" in dockerfile and "pip uninstall -y faiss-cpu" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1 :][:4] == [
        "!pyproject.toml",
        "!README.md",
        "!raycollapse/",
        "!configs/",
    ]
    for path in [*CLUSTER.iterdir(), ROOT / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(
            r"example\.invalid|YOUR[-_]|<[A-Z_-]+>|LoadBalancer|NodePort|0\.0\.0\.0", text
        ), path
