"""The config tree: defaults, files, overrides, and errors that name the key."""

import pytest
from omegaconf.errors import ConfigAttributeError

from raycollapse.config import diff_configs, load_config, to_dict, to_yaml
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
