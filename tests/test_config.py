"""Config loading: typed validation, overrides, and messages that point at the file and line."""

import textwrap
import warnings

import pytest

from slimc.commands.cli import main
from slimc.commands.migrate import migrated_yaml
from slimc.config import CONFIG_VERSION, load_config
from slimc.configs import shipped_configs
from slimc.errors import ConfigError, MissingExtraError
from slimc.pipeline import Pipeline

GOOD = """\
version: 2
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
    with pytest.raises(ConfigError, match=r"c.yaml:9: pipeline.0.pass: unknown pass 'smoothe'; registered passes: .*smooth"):
        load_config(write(tmp_path, GOOD.replace("pass: smooth", "pass: smoothe")))


def test_unknown_pass_parameter_is_an_error_at_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:10: pipeline.0.alpah: unknown key 'alpah'; allowed keys: alpha"):
        load_config(write(tmp_path, GOOD.replace("alpha: 0.8", "alpah: 0.8")))


def test_pass_parameter_out_of_range_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.0.alpha: Input should be less than or equal to 1"):
        load_config(write(tmp_path, GOOD.replace("alpha: 0.8", "alpha: 1.5")))


def test_rule_with_unknown_scheme_names_the_defined_schemes(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown scheme 'w4a4'; schemes: w8a8"):
        load_config(write(tmp_path, GOOD.replace("{scheme: w8a8,", "{scheme: w4a4,")))


def test_bad_glob_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"glob '\*mlp.\[gate' has an unclosed \["):
        load_config(write(tmp_path, GOOD.replace('exclude: ["*mlp.gate"]', 'exclude: ["*mlp.[gate"]')))


def test_pass_order_requirements_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"pass 'lower' needs 'calibrate' earlier"):
        load_config(write(tmp_path, GOOD.replace("  - pass: calibrate\n", "")))


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


def test_a_version_newer_than_this_slimc_is_rejected_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:1: version: this slimc reads config versions 1 to 2, the file says 3; "
                                          r"a newer version needs a newer slimc"):
        load_config(write(tmp_path, GOOD.replace("version: 2", "version: 3")))


@pytest.mark.parametrize("version", ["0", "two", "true"])
def test_a_version_that_is_no_known_version_is_rejected(tmp_path, version):
    with pytest.raises(ConfigError, match="reads config versions 1 to 2"):
        load_config(write(tmp_path, GOOD.replace("version: 2", f"version: {version}")))


V1 = GOOD.replace("version: 2", "version: 1") + "equivalence_tolerance: 0.05  # looser, for this model\n"


def test_a_version_1_config_is_upgraded_in_memory_with_one_warning(tmp_path):
    path = write(tmp_path, V1)
    with pytest.warns(UserWarning, match=r"c.yaml: a version 1 config, upgraded in memory \(version 1 -> 2: "
                                         r"equivalence_tolerance moved to checks.equivalence_tolerance") as warned:
        config = load_config(path)
    assert len(warned) == 1 and "slimc migrate" in str(warned[0].message)
    assert config.version == 2 and config.checks.equivalence_tolerance == 0.05 and config.checks.equivalence


def test_an_error_in_a_migrated_key_points_at_the_line_the_user_wrote(tmp_path):
    path = write(tmp_path, V1.replace("equivalence_tolerance: 0.05", "equivalence_tolerance: -1"))
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"c.yaml:18: checks.equivalence_tolerance: .*greater than 0"):
        load_config(path)


def test_slimc_migrate_refuses_a_file_whose_pass_parameters_are_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:10: pipeline.0.alpah: unknown key 'alpah'; allowed keys: alpha"):
        migrated_yaml(write(tmp_path, V1.replace("alpha: 0.8", "alpah: 0.8")))


def test_a_pass_that_must_run_before_another_names_where_that_one_is(tmp_path):
    text = GOOD.replace("  - pass: smooth\n    alpha: 0.8\n", "  - pass: norm_fusion\n  - pass: smooth\n    alpha: 0.8\n"
                        ).replace("  - pass: lower\n", "  - pass: lower\n  - pass: rotate\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: pipeline.5: rotate must come before smooth \(pipeline.1\), "
                                          r"fake_quant \(pipeline.2\), calibrate \(pipeline.3\), lower \(pipeline.4\): "
                                          "they measure activations that the rotation changes"):
        load_config(write(tmp_path, text))


def test_a_version_1_config_setting_both_the_old_and_the_new_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="both equivalence_tolerance .* and checks.equivalence_tolerance are set"):
        load_config(write(tmp_path, V1 + "checks: {equivalence_tolerance: 0.1}\n"))


def test_migrate_prints_the_upgraded_file_with_its_comments(tmp_path):
    text, changes = migrated_yaml(write(tmp_path, V1))
    assert changes == ["version 1 -> 2: equivalence_tolerance moved to checks.equivalence_tolerance "
                       "(checks.equivalence: false turns the check off)"]
    assert text.startswith("version: 2\n") and "# looser, for this model" in text
    assert "checks:\n  equivalence_tolerance: 0.05" in text and "\nequivalence_tolerance" not in text
    upgraded = write(tmp_path, text, "upgraded.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current file loads without the upgrade warning
        assert load_config(upgraded).checks.equivalence_tolerance == 0.05


def test_every_shipped_config_is_the_current_version():
    for name, path in shipped_configs().items():
        assert load_config(path).version == CONFIG_VERSION, name


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="expands to more than 20000 values"):
        load_config(write(tmp_path, "\n".join(lines) + "\n"))


def test_a_config_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a config file"):
        load_config(tmp_path)


def test_a_config_that_is_not_utf8_text_is_named(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError, match=r"model.bin is not UTF-8 text"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(ConfigError, match="YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"):
        load_config(write(tmp_path, "!!python/object/apply:os.system ['echo hi']\n"))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_validates(name):
    Pipeline.from_config(load_config(shipped_configs()[name]))


@pytest.mark.parametrize(("device", "error", "message"), [
    ("tpu", ConfigError, "not a device slimc knows"),
    ("npu", MissingExtraError, r"torch_npu is not installed, and model.device npu needs it: pip install \"slimc\[npu\]\""),
])
def test_unusable_devices_are_refused_with_the_fix(device, error, message):
    from slimc.commands.compile import check_device

    with pytest.raises(error, match=message):
        check_device(device)


def test_slimc_migrate_prints_the_upgraded_config_on_stdout_and_what_changed_on_stderr(tmp_path, capsys):
    assert main(["migrate", str(write(tmp_path, V1))]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("version: 2\n") and "checks:\n  equivalence_tolerance: 0.05" in captured.out
    assert captured.err.strip() == ("slimc: note: version 1 -> 2: equivalence_tolerance moved to checks.equivalence_tolerance"
                                    " (checks.equivalence: false turns the check off)")


def test_slimc_migrate_from_msmodelslim_prints_a_config_that_loads(tmp_path, capsys):
    source = write(tmp_path, """\
        apiversion: modelslim_v1
        spec:
          process:
            - type: linear_quant
              qconfig:
                act: {scope: per_token, dtype: int8, symmetric: true, method: minmax}
                weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}
              include: ["*"]
              exclude: ["lm_head"]
            - type: kv_smooth
          save: [{type: ascendv1_saver}]
        """, "msmodelslim.yaml")
    assert main(["migrate", "--from", "msmodelslim", str(source)]) == 0
    captured = capsys.readouterr()
    converted = write(tmp_path, captured.out, "converted.yaml")
    config = load_config(converted)
    assert [step.name for step in Pipeline.from_config(config).steps] == ["fake_quant", "calibrate", "lower"]
    assert config.schemes["w8a8_dynamic"].label == "W8A8_DYNAMIC" and config.export[0]["format"] == "mindie"
    assert "slimc: note: spec.process[1] (type: kv_smooth)" in captured.err
