"""Vector data through the loop's data layer, without Ray: real records, Parquet tables, the
catalog, training-set tables, the embedding stage (``pixel`` = the raw values) and generation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycollapse.config import load_config
from raycollapse.data.mog import mixture_entropy, mixture_from_config, sample_mixture
from raycollapse.data.sources import load_records
from raycollapse.data.vectors import VECTOR_COLUMN, VectorRecords
from raycollapse.diffusion.checkpoint import Checkpoint
from raycollapse.diffusion.mlp import VectorDenoiser
from raycollapse.diffusion.sampling import make_scheduler
from raycollapse.errors import UserInputError
from raycollapse.loop.catalog import Catalog, read_train_refs, train_set_table
from raycollapse.seeds import derive_seed
from raycollapse.stages.embed import EmbedShardStage, check_vector_features, features_dict
from raycollapse.stages.embed_inputs import plan_shards
from raycollapse.stages.generate import GenerateStage, sample_settings

MOG = ["data.source=mog", "data.n=300", "data.seed=5", "data.mog.components=3", "data.mog.dim=4"]


def _real(tmp_path) -> VectorRecords:
    cfg = load_config(None, MOG + ["data.mog.mc_samples=20000"])
    real = load_records(cfg.data)
    (tmp_path / "real" / "data").mkdir(parents=True)
    pq.write_table(real.to_arrow_table(), tmp_path / "real" / "data" / "part-00000.parquet")
    return real


def test_mog_records_are_exact_samples_with_components_as_labels(tmp_path):
    cfg = load_config(None, MOG + ["data.mog.mc_samples=20000"])
    real = _real(tmp_path)
    mix = mixture_from_config(cfg.data.mog)
    x, comp = sample_mixture(mix, 300, np.random.default_rng(derive_seed(5, 0)))
    assert isinstance(real, VectorRecords) and real.vectors.dtype == np.float32
    assert np.array_equal(real.vectors, x.astype(np.float32)) and np.array_equal(real.labels, comp)
    h = mixture_entropy(mix, mc_samples=20000, seed=derive_seed(5, 1))
    assert real.meta["entropy_true"] == h.value and real.meta["entropy_true_stderr"] == h.stderr
    table = pq.read_table(tmp_path / "real" / "data" / "part-00000.parquet")
    assert table.schema.field(VECTOR_COLUMN).type == pa.list_(pa.float32())
    assert "image" not in table.column_names
    cat = Catalog(str(tmp_path), 1)
    ids, vecs, labels = cat.images("real")
    assert np.array_equal(vecs, real.vectors) and np.array_equal(labels, comp)
    assert cat.mog_meta()["entropy_true"] == h.value


def test_mog_needs_n():
    with pytest.raises(UserInputError, match="data.n"):
        load_records(load_config(None, ["data.source=mog"]).data)


def test_train_set_table_and_embedding_are_the_raw_vectors(tmp_path):
    real = _real(tmp_path)
    refs = [("real", 7), ("real", 2), ("real", 250)]
    cat = Catalog(str(tmp_path), 1)
    vecs, labels = cat.gather_images(refs)
    folder = tmp_path / "train_set"
    folder.mkdir()
    pq.write_table(train_set_table(refs, vecs, labels), folder / "part-00000.parquet")
    assert read_train_refs(str(folder)) == refs
    stored = pq.read_table(folder / "part-00000.parquet").column(VECTOR_COLUMN).to_pylist()
    assert np.array_equal(np.array(stored, np.float32), real.vectors[[7, 2, 250]])

    tasks = plan_shards(str(tmp_path / "real" / "data"), str(tmp_path / "emb"))
    assert [t.vectors for t in tasks] == [True]
    stage = EmbedShardStage(features=features_dict({"name": "pixel"}), signature={"x": 1})
    stage.setup()
    assert stage.process_shard(tasks[0].to_item()) == 300
    emb = pq.read_table(tasks[0].out)
    x = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert np.array_equal(x, real.vectors)  # no 1/255 scaling: the values themselves
    with pytest.raises(UserInputError, match="feature space of vector data is pixel"):
        check_vector_features(tasks, "dinov2")


def test_generate_stage_writes_vector_shards(tmp_path):
    model = VectorDenoiser(dim=3, hidden=16, depth=1, time_embed_dim=8)
    meta = {"preset": "mlp", "resolution": 8, "channels": 1, "class_conditional": False,
            "num_classes": 10}  # fmt: skip
    sample = sample_settings({"steps": 4, "group_size": 4, "eta": 0.5})
    stage = GenerateStage(checkpoint="unused", out_uri=str(tmp_path), seed=3, sample=sample)
    stage.ckpt = Checkpoint(model, make_scheduler(), meta, "in memory")
    stage.device, stage.net, stage.amp = "cpu", model, None  # what setup() sets on the CPU
    table = stage.shard_table(2, 9)
    assert table.column_names[:2] == ["id", VECTOR_COLUMN]
    x = np.array(table.column(VECTOR_COLUMN).to_pylist(), np.float32)
    assert x.shape == (7, 3) and np.all(np.isfinite(x))
    # Sample i depends on (seed, i) only: ids 4..8 again, as another shard, are the same values.
    again = np.array(stage.shard_table(4, 9).column(VECTOR_COLUMN).to_pylist(), np.float32)
    assert np.array_equal(again, x[2:])
