"""Independent references and small builders shared by the tests.

Every reference here is the plain definition written out (docs/design.md, "KL entropy",
"Generalization score", "Memorized fraction", "Greedy selection", "Threshold decay"): full
float64 distance matrices, sequential loops, no code from ``raycollapse`` that it checks.
The seeded conventions (which numpy call draws the first greedy point, the threshold order, the
random subset) are the documented ones of ``raycollapse.curation.select``.
"""

from __future__ import annotations

import math
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from scipy.special import digamma

# -- Ray -------------------------------------------------------------------------------------

LOCAL_RAY_ARGS = dict(
    num_cpus=2,
    include_dashboard=False,
    object_store_memory=1_500_000_000,
    log_to_driver=False,
)


def start_local_ray():
    """The session's local Ray (2 CPUs, 1.5 GB object store), started on first use."""
    import ray

    if not ray.is_initialized():
        # address='local': never attach to another Ray that happens to run on this machine.
        ray.init(address="local", **LOCAL_RAY_ARGS)
    return ray


def session_ray_address() -> str:
    """The GCS address of this process's Ray, for a subprocess driver that must join it
    (``RAY_ADDRESS``) instead of starting a second Ray on the same machine."""
    import ray

    start_local_ray()
    return ray.get_runtime_context().gcs_address


# -- distances and kNN -----------------------------------------------------------------------


def brute_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full float64 Euclidean distance matrix between the rows of ``a`` and ``b``, from their
    float32 values (the features every component stores and compares)."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    return np.sqrt(((a64[:, None, :] - b64[None, :, :]) ** 2).sum(axis=-1))


def brute_knn(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest entries of each row of ``dist``, ordered by (distance, index)."""
    idx = np.broadcast_to(np.arange(dist.shape[1]), dist.shape)
    order = np.lexsort((idx, dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def brute_knn_self(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """kNN of each row of ``x`` among the others (the point itself excluded by index)."""
    dist = brute_distances(x, x)
    np.fill_diagonal(dist, np.inf)
    return brute_knn(dist, k)


# -- metrics ---------------------------------------------------------------------------------


def kl_entropy_direct(x: np.ndarray, k: int, eps: float = 1e-10) -> float:
    """H = psi(N) - psi(k) + log c_d + (d/N) sum_i log max(r_k(i), eps), written out."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    r_k = brute_knn_self(x, k)[0][:, k - 1]
    log_cd = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_cd + d / n * np.log(np.maximum(r_k, eps)).sum())


def nearest_two(train: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per generated row: distance to the nearest and second-nearest training row."""
    dist = np.sort(brute_distances(gen, train), axis=1)
    return dist[:, 0], dist[:, 1]


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrtm(S_a S_b), with scipy's sqrtm.

    S_a S_b = A^T A B^T B / ((n-1)(m-1)) for the centred rows A, B has the nonzero eigenvalues of
    the small matrix A B^T B A^T / ((n-1)(m-1)) (n x n, XY and YX share them), so the trace of the
    square root is taken there: the same number as sqrtm of the d x d product, without its
    O(d^3) Schur decomposition of a singular matrix (fewer samples than features).
    """
    from scipy import linalg

    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a64.mean(axis=0), b64.mean(axis=0)
    a_c, b_c = a64 - mu_a, b64 - mu_b
    n, m = len(a_c), len(b_c)
    if n > m:  # the smaller side gives the smaller matrix
        a_c, b_c, n, m = b_c, a_c, m, n
    cross = a_c @ b_c.T
    small = cross @ cross.T / ((n - 1) * (m - 1))
    with warnings.catch_warnings():  # rank n - 1 < n: singular, as in practice
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        tr_covmean = float(np.trace(linalg.sqrtm(small)).real)
    tr_a = float((a_c**2).sum()) / (n - 1)
    tr_b = float((b_c**2).sum()) / (m - 1)
    diff = mu_a - mu_b
    return float(diff @ diff + tr_a + tr_b - 2.0 * tr_covmean)


# -- selection -------------------------------------------------------------------------------


def _dist_to(x64: np.ndarray, i: int) -> np.ndarray:
    return np.sqrt(((x64 - x64[i]) ** 2).sum(axis=1))


def plain_random(n: int, budget: int, seed: int) -> np.ndarray:
    """``budget`` distinct indices: ``default_rng(seed).choice(n, budget, replace=False)``."""
    return np.random.default_rng(seed).choice(n, budget, replace=False).astype(np.int64)


def plain_greedy(x: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Farthest-point greedy: first ``default_rng(seed).integers(N)``, then repeatedly the point
    farthest from the selected set (lowest index on ties; the lowest unselected one when only
    exact duplicates of selected points remain)."""
    x64 = np.asarray(x, dtype=np.float64)
    first = int(np.random.default_rng(seed).integers(len(x64)))
    chosen = [first]
    selected = np.zeros(len(x64), dtype=bool)
    selected[first] = True
    m = _dist_to(x64, first)
    while len(chosen) < budget:
        c = int(np.argmax(m))
        if m[c] <= 0.0:
            c = int(np.flatnonzero(~selected)[0])
        chosen.append(c)
        selected[c] = True
        m = np.minimum(m, _dist_to(x64, c))
    return np.asarray(chosen, dtype=np.int64)


def plain_threshold(x: np.ndarray, budget: int, tau0: float, decay: float, seed: int) -> np.ndarray:
    """Threshold decay: order ``default_rng(seed).permutation(N)``; each pass accepts, in order,
    a not-yet-accepted candidate farther than tau from every accepted point (the first always);
    stop at ``budget``; tau <- tau * decay after each pass."""
    x64 = np.asarray(x, dtype=np.float64)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(x64))]
    accepted: list[int] = []
    tau = tau0
    for _ in range(10_000):
        for i in order:
            if i in accepted:
                continue
            if all(float(np.sqrt(((x64[i] - x64[a]) ** 2).sum())) > tau for a in accepted):
                accepted.append(i)
                if len(accepted) == budget:
                    return np.asarray(accepted, dtype=np.int64)
        tau *= decay
    raise AssertionError(f"threshold decay accepted only {len(accepted)} of {budget}")


# -- data ------------------------------------------------------------------------------------


def clustered(n: int, d: int, seed: int, n_clusters: int = 40, offset: float = 0.0) -> np.ndarray:
    """``n`` float32 points in ``n_clusters`` Gaussian blobs of different widths."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=6.0, size=(n_clusters, d))
    scales = rng.uniform(0.3, 1.0, size=n_clusters)
    label = rng.integers(0, n_clusters, size=n)
    x = means[label] + rng.normal(size=(n, d)) * scales[label, None] + offset
    return x.astype(np.float32)


def tiny_checkpoint(
    folder: str | Path,
    *,
    class_conditional: bool = False,
    num_classes: int = 10,
    resolution: int = 8,
    channels: int = 1,
    seed: int = 0,
    num_train_timesteps: int = 1000,
) -> str:
    """A randomly initialised ``tiny`` UNet saved as a checkpoint folder (sampling needs no
    training); returns the folder."""
    from raycollapse.diffusion.checkpoint import save_checkpoint
    from raycollapse.diffusion.sampling import make_scheduler
    from raycollapse.diffusion.unet import build_unet

    unet = build_unet(
        "tiny",
        resolution=resolution,
        channels=channels,
        class_conditional=class_conditional,
        num_classes=num_classes,
        seed=seed,
    )
    meta = {
        "preset": "tiny",
        "resolution": resolution,
        "channels": channels,
        "class_conditional": class_conditional,
        "num_classes": num_classes,
    }
    return save_checkpoint(Path(folder), unet, make_scheduler(num_train_timesteps), meta)


# -- report pages ----------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Every table of a page as rows of cell texts, keyed by the id of the heading before it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self._heading: str | None = None
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._heading = dict(attrs).get("id")
        elif tag == "table" and self._heading is not None:
            self._rows = self.tables.setdefault(self._heading, [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._rows is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._rows = None
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def report_summary(page: str) -> dict[str, dict[str, str]]:
    """The report's "Last iteration" table: run name -> metric -> the text shown."""
    parser = _Tables()
    parser.feed(page)
    rows = parser.tables["summary"]
    runs = rows[0][1:]
    return {run: {r[0]: r[1 + j] for r in rows[1:]} for j, run in enumerate(runs)}


# ---------------------------------------------------------------------------------------------
# TensorBoard event files, read back without the code under test


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path) -> list[bytes]:
    """The records of a TFRecord file, each checked against its two masked CRC-32C."""
    import struct
    from pathlib import Path

    data, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == _masked(_crc32c(header))
        body = data[pos + 12 : pos + 12 + length]
        end = pos + 12 + length
        assert struct.unpack("<I", data[end : end + 4])[0] == _masked(_crc32c(body))
        out.append(body)
        pos = end + 4
    return out


def read_tensorboard(folder) -> tuple[dict[tuple[int, str], list[float]], dict[int, list[bytes]]]:
    """Every event file under ``folder``: (step, tag) -> the scalar values logged (a list, so a
    duplicate shows), and step -> the encoded images logged."""
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    values: dict[tuple[int, str], list[float]] = {}
    images: dict[int, list[bytes]] = {}
    for path in sorted(Path(folder).rglob("*tfevents*")):
        for rec in read_tfrecords(path):
            ev = Event.FromString(rec)
            for v in ev.summary.value:
                if v.HasField("image"):
                    images.setdefault(ev.step, []).append(v.image.encoded_image_string)
                elif v.HasField("tensor"):
                    values.setdefault((ev.step, v.tag), []).extend(v.tensor.double_val)
                else:
                    values.setdefault((ev.step, v.tag), []).append(v.simple_value)
    return values, images
