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


# Leaves of the schema that hold free-form maps: builder arguments, and the variants of each kind
# (each entry overrides its kind's section; see the variants tests below).
LEAF_DICTS = ("scratch.arch_kwargs", "variants.scratch", "variants.feature_extract", "variants.fine_tune",
              "variants.ensemble")


def _yaml_keys(data: dict, prefix: str = "", leaf_dicts: tuple[str, ...] = LEAF_DICTS) -> set[str]:
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
    with pytest.raises(ConfigError, match=r"trian: unknown key \(allowed here: base, distributed, download"):
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


def test_scratch_rules():
    with pytest.raises(ConfigError, match="label_smoothing applies to cross_entropy only"):
        parse_params({"scratch": {"loss": "focal", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="scratch.optimizer = 'adagrad'"):
        parse_params({"scratch": {"optimizer": "adagrad"}})
    with pytest.raises(ConfigError, match="on_the_fly"):
        parse_params({"variants": {"scratch": {"x": {"on_the_fly": True}}}})


# --- variants: one map per kind, each entry overriding its kind's section -------------------------

def _variants(**by_kind) -> dict:
    return {"variants": {"scratch": {}, "feature_extract": {}, "fine_tune": {}, "ensemble": {}, **by_kind}}


def test_repo_variants_resolve_in_table_order_with_their_stages():
    variants = load_params(REPO / "params.yaml").resolved_variants()
    assert [(n, v.kind, v.stage) for n, v in variants.items()] == [
        ("scratch", "scratch", "scratch@scratch"), ("regularized", "scratch", "scratch@regularized"),
        ("feature_extract", "feature_extract", "feature_extract@feature_extract"),
        ("fine_tune", "fine_tune", "fine_tune@fine_tune"), ("ensemble", "ensemble", "evaluate")]
    # `members: all` is every trained variant, in table order
    assert variants["ensemble"].settings.members == ["scratch", "regularized", "feature_extract", "fine_tune"]
    assert variants["ensemble"].settings.combine == "calibrated_mean"
    reg = variants["regularized"].settings
    assert (reg.dropout, reg.train_data, reg.epochs, reg.arch) == (0.3, "augmented", 100, "simple_cnn")
    assert variants["scratch"].settings.epochs == 40  # not overridden: the scratch section's
    assert variants["fine_tune"].settings.from_ == "feature_extract"


def test_an_entry_overrides_only_its_keys_and_nested_head_key_by_key():
    p = parse_params({
        "scratch": {"lr": 0.01},
        "feature_extract": {"head": {"epochs": 7, "lr": 0.5}},
        **_variants(scratch={"lenet": {"arch": "lenet5", "epochs": 20}},
                    feature_extract={"fx": {"backbone": "resnet18", "head": {"lr": 0.1}}}),
    })
    v = p.resolved_variants()
    assert (v["lenet"].settings.arch, v["lenet"].settings.epochs, v["lenet"].settings.lr) == ("lenet5", 20, 0.01)
    head = v["fx"].settings.head
    assert (head.lr, head.epochs) == (0.1, 7)  # its own lr, the section's epochs
    assert v["fx"].settings.backbone == "resnet18"


@pytest.mark.parametrize("variants, message", [
    (_variants(scratch={"lenet": {"archh": "lenet5"}}),
     r"variants\.scratch\.lenet\.archh: unknown key \(allowed here: arch, arch_kwargs"),
    (_variants(scratch={"lenet": {"epochs": 0}}), r"variants\.scratch\.lenet\.epochs = 0: .*greater than or equal to 1"),
    (_variants(scratch={"lenet": {"on_the_fly": True}}), r"variants\.scratch\.lenet: on_the_fly augmentation"),
    (_variants(feature_extract={"fx": {"head": {"lrr": 1}}}), r"variants\.feature_extract\.fx\.head\.lrr: unknown key"),
    (_variants(fine_tune={"ft": {}}), r"variants\.fine_tune\.ft\.from: required"),
    (_variants(scratch={"s": {}}, fine_tune={"ft": {"from": "s"}}),
     r"variants\.fine_tune\.ft\.from = 's': not a feature_extract variant \(have: none\)"),
    (_variants(scratch={"a.b": {}}), r"variants\.scratch\.a\.b: 'a\.b' is not a valid variant name"),
    (_variants(scratch={"../x": {}}), r"'\.\./x' is not a valid variant name"),
    (_variants(scratch={"mcnemar": {}}), r"variants\.scratch\.mcnemar: 'mcnemar' is reserved"),
    (_variants(scratch={"a": {}, "b": {}}, ensemble={"e": {"members": ["a", "c"]}}),
     r"variants\.ensemble\.e\.members: 'c' is not a trained variant \(have: a, b;"),
    (_variants(scratch={"a": {}, "b": {}}, ensemble={"e": {"members": ["a"]}}),
     r"variants\.ensemble\.e\.members: an ensemble needs at least two members, and it lists a;"),
    (_variants(scratch={"a": {}, "b": {}}, ensemble={"e": {"members": "a"}}),
     r"variants\.ensemble\.e: members = 'a': 'all', or a list of variant names"),
    (_variants(scratch={"a": {}, "b": {}}, ensemble={"e": {}, "f": {"members": ["a", "e"]}}),
     r"variants\.ensemble\.f\.members: 'e' is not a trained variant"),
    (_variants(scratch={"a": {}, "b": {}}, ensemble={"e": {"combine": "vote"}}),
     r"variants\.ensemble\.e\.combine = 'vote'"),
    (_variants(scratch={"x": {}}, feature_extract={"x": {}}),
     r"variants\.feature_extract\.x: the name is also used by scratch@x"),
    ({"variants": {"scratch": {}, "feature_extract": {}, "fine_tune": {}}}, r"variants: no variant is declared"),
    ({"variants": {"scrach": {"x": {}}}}, r"variants\.scrach: unknown key \(allowed here: scratch, feature_extract, fine_tune, ensemble\)"),
])
def test_a_bad_variant_entry_is_refused_naming_it(variants: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_params(variants)


def test_an_ensemble_of_all_is_left_out_when_one_variant_is_declared():
    """`members: all` (the default entry) over a single trained variant has nothing to combine."""
    one = parse_params({"variants": {"scratch": {"a": {}}, "feature_extract": {}, "fine_tune": {}}})
    assert list(one.resolved_variants()) == ["a"]
    two = parse_params({"variants": {"scratch": {"a": {}, "b": {}}, "feature_extract": {}, "fine_tune": {}}})
    assert two.resolved_variants()["ensemble"].settings.members == ["a", "b"]


def test_an_entry_with_another_arch_does_not_inherit_the_sections_arch_kwargs():
    p = parse_params({"scratch": {"arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}},
                      **_variants(scratch={"tiny": {}, "lenet": {"arch": "lenet5"},
                                           "lenet_tanh": {"arch": "lenet5", "arch_kwargs": {"activation": "tanh"}}})})
    v = p.resolved_variants()
    assert v["tiny"].settings.arch_kwargs == {"hidden_units": 4}
    assert v["lenet"].settings.arch_kwargs == {}
    assert v["lenet_tanh"].settings.arch_kwargs == {"activation": "tanh"}


def test_every_bad_entry_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params(_variants(scratch={"a": {"archh": 1}, "b": {"lr": -1}}))
    assert "variants.scratch.a.archh" in str(err.value) and "variants.scratch.b.lr = -1" in str(err.value)
