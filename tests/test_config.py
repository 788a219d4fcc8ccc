from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cnnlab.config import ConfigError, Params, load_params, parse_params
from conftest import REPO


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def _yaml_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out |= _yaml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_repo_params_file_is_valid_and_spells_out_every_key():
    params = load_params(REPO / "params.yaml")
    assert params.base.seed == 42
    assert params.download.source == "fashion_mnist"
    assert params.split.max_train_per_class == 200
    # Every key has its value (and reason) in params.yaml, so code defaults never decide an output,
    # which is why dvc.yaml need not list config.py as a dependency.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _yaml_keys(raw) == _keys(Params)
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
