# raycollapse on the official Ray GPU image (Ray 2.60.0, Python 3.11, CUDA 12): the image that the
# KubeRay manifests (cluster/kuberay-*.yaml) run, on the head and on the GPU workers.
#   docker build -t raycollapse:0.1.0 .
# The launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml) start from the same official image and
# install this package from the synced checkout instead, so they need no registry.
# Keep the tag equal to the Ray version in pyproject.toml (tests/cluster/test_cluster_files.py).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR $HOME/raycollapse
# ($HOME: the ray user's home, set by the base image's ENV)
# Dependencies first (a layer that survives code edits), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raycollapse ./raycollapse
# The GPU build of FAISS replaces the CPU one that pyproject.toml names (both provide `faiss`);
# torch from PyPI is the CUDA 12 build on Linux.
RUN pip install --no-cache-dir . \
    && pip uninstall -y faiss-cpu \
    && pip install --no-cache-dir faiss-gpu-cu12 \
    && python -c "import faiss, raycollapse; assert hasattr(faiss, 'StandardGpuResources')"
COPY --chown=ray:users configs ./configs
