from pathlib import Path

import typing

import pytest
import yaml
from pydantic import BaseModel

from cnnlab.config import ConfigError, Params, load_params, parse_params
from conftest import REPO


def _keys(model: type[BaseModel], data: dict, prefix: str = "") -> set[str]:
    """Every leaf key the schema defines; dict-of-model fields expand over the keys ``data`` has."""
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, data.get(name, {}), f"{prefix}{name}.")
        elif typing.get_origin(ann) is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            for key in data.get(name, {}):
                out |= _keys(args[1], data[name][key], f"{prefix}{name}.{key}.")
        else:
            out.add(prefix + name)
    return out


def _yaml_keys(data: dict, prefix: str = "", leaf_dicts: tuple[str, ...] = ("train.arch_kwargs",)) -> set[str]:
    out = set()
    for k, v in data.items():
        key = prefix + k
        out |= _yaml_keys(v, f"{key}.") if isinstance(v, dict) and key not in leaf_dicts else {key}
    return out


def test_repo_params_file_is_valid_and_spells_out_every_key():
    params = load_params(REPO / "params.yaml")
    assert params.base.seed == 42
    assert params.download.source == "fashion_mnist"
    assert params.split.max_train_per_class == 200
    # Every key has its value (and reason) in params.yaml, so code defaults never decide an output,
    # which is why dvc.yaml need not list config.py as a dependency.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _yaml_keys(raw) == _keys(Params, raw)
    assert params == Params()  # and the code's defaults agree with it


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        parse_params({"augment": {"copies": 2, "colour_jitter": {}}})
    msg = str(err.value)
    assert "augment.colour_jitter: unknown key" in msg
    assert "color_jitter" in msg  # the allowed list shows the right spelling


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"trian: unknown key \(allowed here: base, download"):
        parse_params({"trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        parse_params({"split": {"max_train_per_class": "200"}})
    assert "split.max_train_per_class = '200'" in str(err.value)


def test_out_of_range_names_key_value_and_limit():
    with pytest.raises(ConfigError) as err:
        parse_params({"split": {"val_fraction": 1.5}})
    assert "split.val_fraction = 1.5" in str(err.value)
    assert "less than 1" in str(err.value)


def test_cross_field_rule_is_reported_cleanly():
    with pytest.raises(ConfigError) as err:
        parse_params({"split": {"val_fraction": 0.5, "test_fraction": 0.45}})
    msg = str(err.value)
    assert msg.count("\n") == 1  # one readable line, not a dump of the section
    assert "val_fraction + test_fraction = 0.95" in msg


def test_url_source_requires_checksum():
    with pytest.raises(ConfigError, match="download.sha256"):
        parse_params({"download": {"source": "url", "url": "https://example.org/x.zip"}})
    ok = parse_params({"download": {"source": "url", "url": "https://example.org/x.zip", "sha256": "a" * 64}})
    assert ok.download.sha256 == "a" * 64


def test_fashion_mnist_url_takes_one_url_or_a_list_of_http_urls():
    # One string was the only form before mirrors; params files that still use it keep working.
    one = parse_params({"download": {"fashion_mnist_url": "http://mirror.example/fm"}})
    assert one.download.fashion_mnist_url == ["http://mirror.example/fm"]
    not_http = r"download.fashion_mnist_url: 'ftp://mirror.example/fm' is not an http\(s\) URL"
    with pytest.raises(ConfigError, match=not_http):
        parse_params({"download": {"fashion_mnist_url": ["https://ok.example", "ftp://mirror.example/fm"]}})
    with pytest.raises(ConfigError, match=r"download.fashion_mnist_url = \[\]: List should have at least 1 item"):
        parse_params({"download": {"fashion_mnist_url": []}})


def test_null_cap_means_all():
    assert parse_params({"split": {"max_train_per_class": None}}).split.max_train_per_class is None


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)


def test_unknown_key_inside_a_variant():
    with pytest.raises(ConfigError) as err:
        parse_params({"variants": {"scratch": {"dropuot": 0.1}}})
    assert "variants.scratch.dropuot: unknown key (allowed here: dropout, train_data, on_the_fly, epochs)" in str(err.value)


def test_train_rules():
    with pytest.raises(ConfigError, match="label_smoothing applies to cross_entropy only"):
        parse_params({"train": {"loss": "focal", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="train.optimizer = 'adagrad'"):
        parse_params({"train": {"optimizer": "adagrad"}})
    with pytest.raises(ConfigError, match="on_the_fly"):
        parse_params({"variants": {"x": {"on_the_fly": True}}})
