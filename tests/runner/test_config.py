"""Config schema: defaults, overrides, and one-line errors for any bad input."""

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedtrust.errors import ConfigError
from fedtrust.runner.config import RunConfig, build_config, config_to_dict, load_config, section_fields


def test_defaults_are_the_main_job():
    cfg = build_config()
    assert cfg.algorithm.name == "fedavg" and cfg.data.dataset == "digits"
    assert cfg.data.num_clients == 20 and cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5


def test_overrides_beat_file_and_parse_yaml_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"rounds": 7, "data": {"alpha": 0.3}, "algorithm": {"name": "fedprox", "mu": 0.1}}))
    cfg = load_config(f, ["data.alpha=0.1", "algorithm.mu=0.5", "eval.personalized=false"])
    assert cfg.rounds == 7 and cfg.data.alpha == 0.1 and cfg.eval.personalized is False
    assert cfg.algorithm.params() == {"mu": 0.5}


def test_clients_per_round_int_is_count_float_is_fraction():
    assert build_config({}, ["data.clients_per_round=0.5"]).data.clients_per_round == 0.5
    assert build_config({}, ["data.clients_per_round=3"]).data.clients_per_round == 3
    with pytest.raises(ConfigError, match="fraction"):
        build_config({}, ["data.clients_per_round=1.5"])
    with pytest.raises(ConfigError, match="exceeds"):
        build_config({}, ["data.clients_per_round=30"])


def test_augmentation_pipelines_and_data_options_validate_with_the_old_defaults():
    """Rules out a schema that rejects pipelines (or the old names), and defaults other than today's."""
    cfg = build_config()
    assert (cfg.data.augment, cfg.data.normalize, cfg.data.longtail_order, cfg.train.drop_last) == (
        "auto", "dataset", "first", False)
    for kind in ("none", "flip", "crop", "crop_flip", "crop+flip", "crop+flip+color_jitter+grayscale", "grayscale"):
        assert build_config({}, [f"data.augment={kind}"]).data.augment == kind


@pytest.mark.parametrize("override, fragment", [
    ("foo=1", "unknown config key 'foo'"),
    ("data.foo=1", "unknown config key 'data.foo'"),
    ("data.alpha=-1", "'data.alpha'"),
    ("rounds=abc", "'rounds'"),
    ("algorithm.name=fedavgg", "did you mean fedavg"),
    ("algorithm.mu=0.1", "unknown config key 'algorithm.mu'"),
    ("model.name=resnet99", "unknown model"),
    ("model.depth=3", "unknown config key 'model.depth'"),
    ("data.dataset=imagenet", "unknown dataset"),
    ("data.partition=pathological", "unknown partitioner"),
    ("train.optimizer=rmsprop", "'train.optimizer'"),
    ("device=tpu", "'device'"),
    ("data=3", "'data'"),
    ("rounds", "not key=value"),
    ("data.augment=crop+rotate", "config key 'data.augment': unknown augmentation primitive 'rotate'"),
    ("data.augment=flip+crop", "in the order crop+flip+color_jitter+grayscale"),
    ("data.normalize=imagenet", "'data.normalize'"),
    ("data.longtail_order=last", "'data.longtail_order'"),
    ("train.drop_last=maybe", "'train.drop_last'"),
])
def test_bad_config_is_one_line_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        build_config({}, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_resolved_config_round_trips():
    cfg = build_config({}, ["algorithm.name=fedprox", "algorithm.mu=0.2", "model.width=16"])
    again = RunConfig.model_validate(config_to_dict(cfg))
    assert again == cfg and config_to_dict(again)["algorithm"] == {"name": "fedprox", "mu": 0.2}


def test_every_schema_key_has_a_description():
    missing = [key for key, _, desc in section_fields() if not desc]
    assert not missing


KEYS = [k for k, _, _ in section_fields()] + ["algorithm.mu", "model.width", "bogus", "data.bogus", "eval.x.y"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=4))
@example(items={"algorithm": {"\n": 0}})  # session 42: an unknown key holding a newline broke the line
@example(items={"model": {"\n": 0}})
@example(items={"data.dataset_params": {"a\nb": 1}})
def test_random_configs_are_valid_or_one_line_config_errors(items):
    tree: dict = {}
    try:
        for key, value in items.items():
            node = tree
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
            node[parts[-1]] = value
        build_config(tree)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 600
