"""The layout of a run directory: one place that names every file of a run.

```
<run>/config.yaml                 the resolved config of the run
<run>/metrics.json                one row per finished iteration (a JSON list), also
<run>/metrics.parquet             as Parquet
<run>/iter_000/train_set/         Parquet shards {id, image (PNG bytes), label, source, origin}
<run>/iter_000/model/             diffusers save_pretrained folder (safetensors) + raycollapse.json
<run>/iter_000/pool/              generated candidates, Parquet shards {id, image, label, iteration, seed}
<run>/iter_000/embeddings/<f>/    embeddings of the pool in feature space <f>, shards {id, embedding}
<run>/iter_000/samples.png        a grid of the first generated samples
<run>/iter_000/nearest.parquet    the most memorized samples: {gen_id, train_id, d1, d2,
                                  gen_image, train_image (PNG bytes)}
<run>/iter_000/metrics.json       this iteration's metrics row
<run>/iter_000/_done/<stage>      completion markers, written last, atomically
```

``origin`` says where a training image came from: ``real`` or ``gen_<k>`` (generated in
iteration k). Iteration 0 trains on real data.
"""

from __future__ import annotations

from raycollapse.io.storage import join

CONFIG = "config.yaml"
METRICS_JSON = "metrics.json"
METRICS_PARQUET = "metrics.parquet"
TRAIN_SET = "train_set"
MODEL = "model"
POOL = "pool"
EMBEDDINGS = "embeddings"
SAMPLES_PNG = "samples.png"
NEAREST = "nearest.parquet"
ITER_METRICS = "metrics.json"
DONE = "_done"
# the stages of every iteration, in order (iteration 0 also has stage "real" before them)
STAGES = ("train_set", "train", "generate", "embed", "metrics")


def iter_dir(run: str, iteration: int) -> str:
    return join(run, f"iter_{iteration:03d}")


def iter_path(run: str, iteration: int, *parts: str) -> str:
    return join(iter_dir(run, iteration), *parts)


def done_marker(run: str, iteration: int, stage: str) -> str:
    return iter_path(run, iteration, DONE, stage)
