"""FAISS devices: whether the GPU build is installed, and ``"cpu"``/``"cuda[:N]"`` parsing."""

from __future__ import annotations

import faiss

from raycollapse.errors import UserInputError

__all__ = ["GPU_MAX_K", "faiss_has_gpu", "parse_device"]

# FAISS GPU flat indexes return at most this many neighbours per query.
GPU_MAX_K = 2048


def faiss_has_gpu() -> bool:
    """True when the installed FAISS is the GPU build (``faiss-gpu``)."""
    return hasattr(faiss, "StandardGpuResources")


def parse_device(device: str) -> int | None:
    """None for the CPU, else the CUDA device number. Raises when the GPU build is missing."""
    if device == "cpu":
        return None
    if not isinstance(device, str) or not (device == "cuda" or device.startswith("cuda:")):
        raise UserInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not faiss_has_gpu():
        raise UserInputError(
            f"device={device!r} needs the GPU build of FAISS, but faiss-gpu is not installed "
            "(this is faiss-cpu); install faiss-gpu on the GPU nodes or use device='cpu'"
        )
    gpu = int(device.split(":", 1)[1]) if ":" in device else 0
    available = faiss.get_num_gpus()
    if gpu >= available:
        raise UserInputError(
            f"device={device!r} but FAISS sees {available} GPU(s); use a visible GPU or 'cpu'"
        )
    return gpu
