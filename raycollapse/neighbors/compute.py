"""Where the exact core (greedy, threshold decay, kNN entropy) computes: device and backend.

``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees a GPU, else the
CPU). ``backend``: ``numpy`` (the CPU implementations), ``torch`` (torch tensors on the device,
CPU included) or ``auto`` (torch on CUDA, numpy on the CPU). Every combination gives the same
result index for index (docs/design.md, "Greedy selection"); a CUDA request that cannot be met
raises at once, naming the device (no silent fallback to the CPU).

The torch backend keeps the CPU code's exactness discipline: float32 matrix products with
TF32 disabled (:func:`exact_matmul`) decide what is outside a rigorous error bound, and the
rest is re-decided with :func:`canonical_distances`, which reproduces numpy's float64
summation order bit for bit (:func:`~raycollapse.neighbors.distances.pair_distances`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from raycollapse.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "Compute",
    "canonical_distances",
    "exact_matmul",
    "exact_sqrt",
    "resolve_compute",
    "torch_threads",
]

Backend = Literal["auto", "numpy", "torch"]
BACKENDS = ("auto", "numpy", "torch")
_PW_BLOCK = 128  # numpy's pairwise-summation block (PW_BLOCKSIZE)
_ROWS = 1 << 16  # rows per chunk of the float64 differences


@dataclass(frozen=True)
class Compute:
    """A resolved device: ``device`` is ``"cpu"`` or ``"cuda:N"``; ``backend`` is ``numpy``
    or ``torch``."""

    device: str = "cpu"
    backend: str = "numpy"

    @property
    def torch(self) -> bool:
        """Whether the torch implementations run."""
        return self.backend == "torch"

    @property
    def cuda(self) -> bool:
        """Whether the device is a GPU."""
        return self.device.startswith("cuda")


def resolve_compute(device: Any = "cpu", backend: Any = "auto") -> Compute:
    """Check ``device`` and ``backend`` (module docstring) and resolve ``auto``.

    Raises UserInputError for an unknown name, for CUDA without a visible CUDA device (naming
    the device asked for) and for ``backend='numpy'`` on CUDA.
    """
    if backend not in BACKENDS:
        raise UserInputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ok = isinstance(device, str) and (
        device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit())
    )
    if not ok:
        raise UserInputError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device == "cpu" and backend != "torch":
        return Compute("cpu", "numpy")  # the default path never imports torch
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return Compute("cpu", "torch" if backend == "torch" else "numpy")
    if not torch.cuda.is_available():
        raise UserInputError(
            f"device={device!r} but torch sees no CUDA device (torch.cuda.is_available() is "
            "False); run on a GPU node or use device='cpu'"
        )
    gpu = int(device[5:]) if ":" in device else 0
    count = torch.cuda.device_count()
    if gpu >= count:
        raise UserInputError(
            f"device={device!r} but torch sees {count} CUDA device(s); use cuda:0..cuda:{count - 1}"
        )
    if backend == "numpy":
        raise UserInputError(
            f"backend='numpy' runs on the CPU only, but device={device!r}; use backend='torch' "
            "(or 'auto') on a GPU"
        )
    return Compute(f"cuda:{gpu}", "torch")


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """float32 matrix products in float32 arithmetic (TF32 and reduced-precision reductions
    off) for the block: the error bounds of :class:`~raycollapse.curation.approx.ApproxSpace`
    assume float32 products. Restores the previous settings."""
    import torch

    prec = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(prec)


@contextlib.contextmanager
def torch_threads(compute: Compute) -> Iterator[None]:
    """One torch intra-op thread for the block when the torch backend runs on the CPU.

    Its loops issue many small operations; torch's OpenMP threads spin-wait at each and stall
    when a core is shared (measured on the 2-core dev machine under load: greedy on 3,000
    points took 6 s with 2 threads, 0.25 s with 1), as multi-threaded BLAS does for the numpy
    backend (:func:`~raycollapse.neighbors.threads.blas_single_threaded`). A no-op otherwise.
    """
    if not compute.torch or compute.cuda:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_SQRT_OK: dict[str, bool] = {}


def exact_sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 square root, as numpy's.

    torch's CPU kernel for float64 sqrt is not correctly rounded (it differs from numpy by an
    ulp on some inputs), so CPU tensors go through numpy (zero copy). CUDA's sqrt is IEEE
    correctly rounded; this is checked once per device against numpy, and a device that fails
    the check also goes through numpy.
    """
    import torch

    dev = str(t.device)
    if t.is_cuda and dev not in _SQRT_OK:
        probe = np.random.default_rng(0).uniform(0.0, 1e4, 1 << 16) ** 2
        got = torch.sqrt(torch.from_numpy(probe).to(t.device)).cpu().numpy()
        _SQRT_OK[dev] = bool(np.array_equal(got, np.sqrt(probe)))
    if t.is_cuda and _SQRT_OK[dev]:
        return torch.sqrt(t)
    host = t.detach().cpu().numpy()
    return torch.from_numpy(np.sqrt(host)).to(t.device)


def _pairwise_sum(sq: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """numpy's pairwise sum of columns ``lo .. lo + n`` of ``sq``, per row, in numpy's order
    (8 running sums per block of at most 128 values, blocks halved recursively)."""
    if n < 8:
        res = sq[:, lo].clone()
        for i in range(1, n):
            res = res + sq[:, lo + i]
        return res
    if n <= _PW_BLOCK:
        m = n - n % 8
        r = sq[:, lo : lo + 8].clone()
        for i in range(8, m, 8):
            r = r + sq[:, lo + i : lo + i + 8]
        res = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + (
            (r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7])
        )
        for i in range(m, n):
            res = res + sq[:, lo + i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(sq, lo, n2) + _pairwise_sum(sq, lo + n2, n - n2)


def canonical_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The canonical distances of paired float32 rows ``a[i]``, ``b[i]`` (or one row ``b``),
    bit for bit those of :func:`~raycollapse.neighbors.distances.pair_distances`: float64
    differences (exact), squares, numpy's pairwise summation order, correctly rounded sqrt."""
    import torch

    n, d = a.shape
    out = torch.empty(n, dtype=torch.float64, device=a.device)
    one = b.ndim == 1
    for s in range(0, n, _ROWS):
        bb = b if one else b[s : s + _ROWS]
        diff = a[s : s + _ROWS].double() - bb.double()
        diff.mul_(diff)
        out[s : s + _ROWS] = _pairwise_sum(diff, 0, d)
    return exact_sqrt(out)
