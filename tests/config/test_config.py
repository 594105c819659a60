"""The config tree: defaults, files, overrides, and errors that name the key."""

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import get_args

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from raycollapse.config import (
    Config,
    KnnConfig,
    SampleConfig,
    diff_configs,
    load_config,
    schema,
    to_dict,
    to_yaml,
)
from raycollapse.errors import UserInputError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("knn:\n  k: 7\nselect:\n  method: threshold\n")
    cfg = load_config(f, ["knn.eps=1e-8", "loop.metric_features=[pixel,clip]"])
    assert cfg.knn.k == 7
    assert cfg.knn.eps == pytest.approx(1e-8)
    assert cfg.select.method == "threshold"
    assert list(cfg.loop.metric_features) == ["pixel", "clip"]
    assert "k: 7" in to_yaml(cfg)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserInputError) as err:
        load_config(None, ["knn.kk=3"])
    msg = str(err.value)
    assert (
        "knn.kk" in msg and "batch_size" in msg and "eps" in msg and "Did you mean 'knn.k'" in msg
    )


def test_unknown_section_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("knnn:\n  k: 3\n")
    with pytest.raises(UserInputError, match="knnn.*Valid keys at the top level.*knn"):
        load_config(f)


@pytest.mark.parametrize(
    "override, fragment",
    [("knn.k=abc", "knn.k"), ("select.method=foo", "expected one of"), ("knn.k", "key=value")],
)
def test_bad_values(override, fragment):
    with pytest.raises(UserInputError, match=fragment):
        load_config(None, [override])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("knn: [1, 2\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserInputError, match="mapping"):
        load_config(scalar)


def test_struct_mode_rejects_new_keys_later():
    cfg = load_config()
    with pytest.raises(ConfigAttributeError):
        cfg.knn.not_a_key = 1


def test_diff_configs():
    a = to_dict(load_config())
    b = to_dict(load_config(None, ["knn.k=9", "seed=4"]))
    assert diff_configs(a, b) == [("knn.k", 3, 9), ("seed", 0, 4)]


# ------------------------------------------------------------------------- one conversion


def test_to_dict_takes_every_form_of_a_section():
    cfg = load_config(None, ["knn.k=9"])
    expected_knn = {
        "k": 9,
        "eps": 1e-10,
        "batch_size": 65536,
        "shards": 1,
        "bootstrap": 0,
        "device": "cpu",
        "backend": "auto",
    }
    assert to_dict(cfg)["knn"] == expected_knn
    assert to_dict(cfg.knn) == expected_knn
    assert to_dict(KnnConfig(k=9)) == expected_knn
    assert to_dict({"k": 9, "eps": 1e-10}) == {"k": 9, "eps": 1e-10}  # a mapping as it is
    # over the defaults: missing keys take them; None means all defaults
    assert to_dict({"k": 9}, KnnConfig) == expected_knn
    assert to_dict(None, KnnConfig) == {**expected_knn, "k": 3}
    assert to_dict(cfg.knn, KnnConfig) == expected_knn
    assert type(to_dict(cfg)["loop"]["metric_features"]) is list  # plain containers only


def test_to_dict_resolves_interpolations_and_checks_against_defaults():
    node = OmegaConf.create({"seed": 5, "train": {"seed": "${seed}"}})
    assert to_dict(node) == {"seed": 5, "train": {"seed": 5}}
    assert to_dict({"seed": "${n}", "n": 4}, SampleConfig)["seed"] == 4
    with pytest.raises(UserInputError, match="unknown config key 'groupsize'.*group_size"):
        to_dict({"groupsize": 4}, SampleConfig)
    with pytest.raises(UserInputError, match="steps"):
        to_dict({"steps": "many"}, SampleConfig)


def test_to_yaml_of_a_tree_a_dataclass_and_a_dict_agree():
    cfg = load_config(None, ["seed=3"])
    text = to_yaml(cfg)
    assert text == OmegaConf.to_yaml(cfg, resolve=True)
    assert to_yaml(Config(seed=3)) == text
    assert to_yaml(to_dict(cfg)) == text
    assert yaml.safe_load(text) == to_dict(cfg)


# --------------------------------------------------------------------- typed name lists


def test_metric_features_are_typed():
    with pytest.raises(UserInputError, match=r"loop.metric_features\[1\].*'sift'.*dinov2"):
        load_config(None, ["loop.metric_features=[pixel,sift]"])
    cfg = load_config(None, ["loop.metric_features=[dinov2,inception]"])
    with pytest.raises(ValidationError):
        cfg.loop.metric_features.append("sift")


NAME_LISTS = {
    "Source": ("digits", "cifar10", "folder", "parquet", "mog"),
    "Preset": ("tiny", "unet32", "unet48", "unet64", "unet128", "mlp"),
    "Sampler": ("ddim", "ddpm"),
    "Feature": ("pixel", "clip", "dinov2", "inception"),
    "SelectMethod": ("none", "random", "greedy", "threshold"),
    "Paradigm": ("replace", "accumulate", "accumulate_all", "fresh"),
}


def test_name_lists_are_the_literals_of_the_schema():
    assert schema.SOURCES == get_args(schema.Source) == NAME_LISTS["Source"]
    assert schema.PRESET_NAMES == get_args(schema.Preset) == NAME_LISTS["Preset"]
    assert schema.SAMPLERS == get_args(schema.Sampler) == NAME_LISTS["Sampler"]
    assert schema.FEATURE_NAMES == get_args(schema.Feature) == NAME_LISTS["Feature"]
    assert schema.SELECT_METHODS == get_args(schema.SelectMethod) == NAME_LISTS["SelectMethod"]
    assert schema.PARADIGMS == get_args(schema.Paradigm) == NAME_LISTS["Paradigm"]
    hints = typing.get_type_hints(schema.LoopConfig)
    assert hints["metric_features"] == list[schema.Feature]
    # the modules that check or dispatch on the names use these very lists
    from raycollapse.curation import paradigms
    from raycollapse.data import sources
    from raycollapse.diffusion import sampling, unet
    from raycollapse.features import weights

    assert tuple(unet.PRESETS) == schema.PRESET_NAMES
    assert sampling.SAMPLERS is schema.SAMPLERS
    assert paradigms.PARADIGMS is schema.PARADIGMS
    assert weights.EXTRACTORS is schema.FEATURE_NAMES
    assert set(sources.PATH_HINTS) == set(schema.SOURCES) - {"digits", "mog"}


def _string_sequences(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts:
            if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                yield node.lineno, frozenset(e.value for e in node.elts)


def test_each_name_list_is_written_once():
    """No module but the schema spells out a whole name list again (a tuple, list or set)."""
    package = Path(schema.__file__).resolve().parents[1]
    lists = {frozenset(v): k for k, v in NAME_LISTS.items()}
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for line, values in _string_sequences(tree):
            if values in lists:
                found.append((str(path.relative_to(package)), line, lists[values]))
    assert found == [("config/schema.py", line, name) for _, line, name in found]
    assert {name for _, _, name in found} == set(NAME_LISTS)  # one Literal each


# ------------------------------------------------------------------ documented fields


def _field_docs(cls: type) -> dict[str, str]:
    """Field -> the string literal right below its declaration in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            is_doc = (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            )
            docs[stmt.target.id] = nxt.value.value.strip() if is_doc else ""
    return docs


SECTIONS = [
    Config,
    schema.DataConfig,
    schema.ModelConfig,
    schema.DiffusionConfig,
    schema.TrainConfig,
    SampleConfig,
    schema.FeaturesConfig,
    KnnConfig,
    schema.SelectConfig,
    schema.ResourcesConfig,
    schema.LoopConfig,
    schema.MetricsConfig,
    schema.TrackingConfig,
]


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_is_documented_where_it_is_declared(cls):
    docs = _field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    undocumented = [name for name, doc in docs.items() if len(doc) < 8]
    assert undocumented == []
    assert cls.__doc__


def test_the_root_holds_every_section():
    assert {f.type for f in dataclasses.fields(Config) if f.name != "seed"} == {
        c.__name__ for c in SECTIONS[1:]
    }
