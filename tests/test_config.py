"""Config loading: typed validation, overrides, and messages that point at the file and line."""

import textwrap

import pytest

from slimc.cli import shipped_configs
from slimc.config import load_config
from slimc.errors import ConfigError
from slimc.pipeline import Pipeline

GOOD = """\
version: 1
model: {dtype: float32}
calibration: {samples: 8, seq_len: 64}
schemes:
  w8a8:
    weight: {dtype: int8, granularity: per_channel}
    act: {dtype: int8, granularity: per_token, dynamic: true}
pipeline:
  - pass: smooth
    alpha: 0.8
  - pass: fake_quant
    rules:
      - {scheme: w8a8, include: ["*"], exclude: ["*mlp.gate"]}
  - pass: calibrate
  - pass: lower
export:
  - format: mindie
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_config_builds_its_pipeline_with_typed_parameters(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    pipeline = Pipeline.from_config(config)
    assert [step.name for step in pipeline.steps] == ["smooth", "fake_quant", "calibrate", "lower"]
    assert pipeline.steps[0].alpha == 0.8
    assert config.schemes["w8a8"].label == "W8A8_DYNAMIC"


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    path = write(tmp_path, GOOD.replace("calibration: {samples: 8, seq_len: 64}", "calibration: {samples: 8, seqlen: 64}"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}:3" in message and "calibration.seqlen" in message and "unknown key 'seqlen'" in message
    assert "seq_len" in message


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:3: calibration.samples: .*integer.*'many'"):
        load_config(write(tmp_path, GOOD.replace("samples: 8", "samples: many")))


def test_bad_enum_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"schemes.w8a8.weight.dtype: Input should be 'int8' or 'int4' \(got 'int3'\)"):
        load_config(write(tmp_path, GOOD.replace("weight: {dtype: int8", "weight: {dtype: int3")))


def test_unknown_pass_lists_registered_passes(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("pass: smooth", "pass: smoothe")))
    with pytest.raises(ConfigError, match=r"c.yaml:9: pipeline.0.pass: unknown pass 'smoothe'; registered passes: .*smooth"):
        Pipeline.from_config(config)


def test_unknown_pass_parameter_is_an_error_at_its_line(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("alpha: 0.8", "alpah: 0.8")))
    with pytest.raises(ConfigError, match=r"c.yaml:10: pipeline.0.alpah: unknown key 'alpah'; allowed keys: alpha"):
        Pipeline.from_config(config)


def test_pass_parameter_out_of_range_is_an_error(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("alpha: 0.8", "alpha: 1.5")))
    with pytest.raises(ConfigError, match=r"pipeline.0.alpha: Input should be less than or equal to 1"):
        Pipeline.from_config(config)


def test_rule_with_unknown_scheme_names_the_defined_schemes(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("{scheme: w8a8,", "{scheme: w4a4,")))
    with pytest.raises(ConfigError, match=r"unknown scheme 'w4a4'; schemes: w8a8"):
        Pipeline.from_config(config)


def test_bad_glob_is_rejected(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace('exclude: ["*mlp.gate"]', 'exclude: ["*mlp.[gate"]')))
    with pytest.raises(ConfigError, match=r"glob '\*mlp.\[gate' has an unclosed \["):
        Pipeline.from_config(config)


def test_pass_order_requirements_are_checked(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("  - pass: calibrate\n", "")))
    with pytest.raises(ConfigError, match=r"pass 'lower' needs 'calibrate' earlier"):
        Pipeline.from_config(config)


def test_set_overrides_parse_values_as_yaml_and_reach_list_items(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["calibration.samples=16", "pipeline.0.alpha=0.3", "model.dtype=bfloat16"])
    assert config.calibration.samples == 16
    assert config.model.dtype == "bfloat16"
    assert Pipeline.from_config(config).steps[0].alpha == 0.3


def test_invalid_override_value_is_reported_as_coming_from_set(tmp_path):
    with pytest.raises(ConfigError, match=r"\(--set\): calibration.samples: Input should be greater than 0"):
        load_config(write(tmp_path, GOOD), ["calibration.samples=0"])


def test_malformed_override_explains_the_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(tmp_path, GOOD), ["calibration.samples"])


def test_unsupported_version_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="reads config version 1, the file says 2"):
        load_config(write(tmp_path, GOOD.replace("version: 1", "version: 2")))


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(ConfigError, match="YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"):
        load_config(write(tmp_path, "!!python/object/apply:os.system ['echo hi']\n"))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_validates(name):
    Pipeline.from_config(load_config(shipped_configs()[name]))


@pytest.mark.parametrize(("device", "message"), [("tpu", "not a device slimc knows"), ("npu", "torch_npu is not installed")])
def test_unusable_devices_are_refused_with_the_fix(device, message):
    from slimc.compile import check_device

    with pytest.raises(ConfigError, match=message):
        check_device(device)
