"""msModelSlim V1 configs convert into slimc configs that load, and every part that does not map is named."""

import json
import textwrap

import pytest
import yaml

from slimc.commands.compile import build_backends, compile_model
from slimc.config import CONFIG_VERSION, config_from_data
from slimc.config.msmodelslim import expand_braces, from_msmodelslim, read_msmodelslim
from slimc.errors import ConfigError
from slimc.pipeline import Pipeline

W8A8_DYNAMIC = """\
apiversion: modelslim_v1
metadata:
  config_id: llama-w8a8-dynamic
  label: {w_bit: 8, a_bit: 8, is_sparse: False, kv_cache: False}
spec:
  process:
    - type: "linear_quant"
      qconfig:
        act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
        weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
      include: ["*"]
      exclude: ["*mlp.gate", "lm_head"]
  dataset: mix_calib.jsonl
  save:
    - type: "ascendv1_saver"
      part_file_size: 4
"""

W8A8_STATIC_ITER_SMOOTH = """\
apiversion: modelslim_v1
spec:
  process:
    - type: "iter_smooth"
      alpha: 0.8
      scale_min: 0.001
      symmetric: False
      enable_subgraph_type: ["norm-linear", "ov"]
    - type: "linear_quant"
      qconfig:
        act: {scope: "per_tensor", dtype: "int8", symmetric: False, method: "minmax"}
        weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
  save: [{type: ascendv1_saver}]
"""

W4A8_QUAROT = """\
apiversion: modelslim_v1
spec:
  process:
    - type: "quarot"
      online: False
    - type: "linear_quant"
      qconfig:
        act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
        weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "ssz", ext: {step: 10}}
      include: ["*"]
  save: [{type: ascendv1_saver, part_file_size: 4}]
"""

ANCHORS = """\
apiversion: modelslim_v1
default_w8a8_dynamic: &default_w8a8_dynamic
  act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
  weight: &int8_weight {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
default_w4a16: &default_w4a16
  weight:
    <<: *int8_weight
    dtype: "int4"
spec:
  process:
    - type: "linear_quant"
      qconfig: *default_w8a8_dynamic
      include: ["*self_attn*"]
    - type: "linear_quant"
      qconfig: *default_w4a16
      include: ["*mlp*"]
  save: [{type: ascendv1_saver}]
"""

# msModelSlim quantizes a layer with the first step that selects it: down_proj gets w8a8_dynamic, not w4a8.
OVERLAPPING = """\
apiversion: modelslim_v1
w8a8: &w8a8
  act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
  weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
w4a8: &w4a8
  act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
  weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "minmax"}
spec:
  process:
    - type: "group"
      configs:
        - type: "linear_quant"
          qconfig: *w8a8
          include: ["*down_proj", "model.layers.{0,1}.self_attn.q_proj"]
        - type: "linear_quant"
          qconfig: *w4a8
          include: ["*"]
          exclude: ["*mlp.gate"]
  save: [{type: ascendv1_saver}]
"""


def convert(text: str, source: str = "m.yaml"):
    """Convert YAML in msModelSlim's schema; the result must load, build its pipeline and its backends."""
    data, notes = from_msmodelslim(yaml.safe_load(textwrap.dedent(text)), source=source)
    config = config_from_data(data)
    pipeline = Pipeline.from_config(config)
    build_backends(config)
    return data, notes, config, pipeline


def passes(data: dict) -> list[str]:
    return [step["pass"] for step in data["pipeline"]]


def with_process(*steps: str) -> str:
    """A W8A8 dynamic config with more processors before its linear_quant."""
    extra = "".join(textwrap.indent(textwrap.dedent(step), "    ") for step in steps)
    return W8A8_DYNAMIC.replace("  process:\n", "  process:\n" + extra)


# --- what converts ------------------------------------------------------------------------------------


def test_w8a8_dynamic_llm_config_converts_to_a_per_token_scheme_one_rule_and_mindie_export():
    data, notes, config, _ = convert(W8A8_DYNAMIC)
    assert list(data) == ["version", "model", "calibration", "schemes", "pipeline", "export"]
    assert data["version"] == CONFIG_VERSION
    assert data["calibration"] == {"dataset": "builtin:text"}
    assert data["schemes"] == {"w8a8_dynamic": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True, "observer": "minmax"},
        "act": {"dtype": "int8", "granularity": "per_token", "symmetric": True, "dynamic": True},
    }}
    assert config.schemes["w8a8_dynamic"].label == "W8A8_DYNAMIC"
    assert passes(data) == ["fake_quant", "calibrate", "lower"]
    assert data["pipeline"][0]["rules"] == [{"scheme": "w8a8_dynamic", "include": ["*"], "exclude": ["*mlp.gate", "lm_head"]}]
    assert data["export"] == [{"format": "mindie", "max_shard_size": "4GiB"}]
    assert notes == ["spec.dataset: 'mix_calib.jsonl': msModelSlim's lab_calib files do not ship with slimc; "
                     "calibration.dataset builtin:text (or your own file, docs/config.md)"]


def test_static_per_tensor_asymmetric_activations_with_iter_smooth_give_smooth_and_a_static_scheme():
    data, notes, config, _ = convert(W8A8_STATIC_ITER_SMOOTH)
    assert passes(data) == ["smooth", "fake_quant", "calibrate", "lower"]
    assert data["pipeline"][0] == {"pass": "smooth", "alpha": 0.8, "subgraphs": ["norm-linear", "v-o"]}
    act = data["schemes"]["w8a8_static"]["act"]
    assert act == {"dtype": "int8", "granularity": "per_tensor", "symmetric": False, "dynamic": False, "observer": "minmax"}
    assert config.schemes["w8a8_static"].label == "W8A8"
    assert "spec.process[0] (type: iter_smooth): scale_min 0.001: slimc clamps smoothing scales to [1e-5, 1e5]" in notes
    assert any(n.startswith("spec.process[0] (type: iter_smooth): symmetric: false") and "scales only" in n for n in notes)


def test_w4a8_with_quarot_fuses_norms_and_rotates_before_fake_quant():
    data, notes, config, _ = convert(W4A8_QUAROT)
    assert passes(data) == ["norm_fusion", "rotate", "fake_quant", "calibrate", "lower"]
    assert data["pipeline"][1] == {"pass": "rotate", "seed": 0, "online_down": False}
    assert data["schemes"]["w4a8_dynamic"]["weight"]["observer"] == "mse"
    assert config.schemes["w4a8_dynamic"].label == "W4A8_DYNAMIC"
    assert ("spec.process[1] (type: linear_quant): qconfig.weight.method ssz (least-squares scale search, 10 steps): "
            "observer mse, slimc's clipping search for the lowest weight error") in notes


def test_quarot_online_rotates_down_projections_online_and_says_what_happens_to_o_proj():
    data, notes, _, _ = convert(W4A8_QUAROT.replace("online: False", "online: True\n      block_size: 64"))
    assert data["pipeline"][1]["online_down"] is True
    assert any("online: true" in n and "o_proj" in n for n in notes)
    assert "spec.process[0] (type: quarot): block_size 64: no rotate option; slimc rotates with full-width Hadamards" in notes


def test_anchors_and_merge_keys_are_resolved_when_read(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(ANCHORS)
    data, _ = from_msmodelslim(read_msmodelslim(path), source=str(path))
    config_from_data(data)
    assert data["schemes"]["w4a16"]["weight"] == {"dtype": "int4", "granularity": "per_channel", "symmetric": True,
                                                  "observer": "minmax"}
    assert "act" not in data["schemes"]["w4a16"]
    assert [rule["scheme"] for rule in data["pipeline"][0]["rules"]] == ["w4a16", "w8a8_dynamic"]


def test_overlapping_linear_quant_steps_keep_msmodelslims_first_step_wins_precedence():
    data, _, config, pipeline = convert(OVERLAPPING)
    rules = data["pipeline"][0]["rules"]
    assert [rule["scheme"] for rule in rules] == ["w4a8_dynamic", "w8a8_dynamic"]  # reversed: in slimc the later wins
    fake_quant = pipeline.steps[0]
    chosen = {name: fake_quant.scheme_for(name, config)[0] for name in (
        "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj",
        "model.layers.0.mlp.up_proj")}
    assert chosen == {"model.layers.0.mlp.down_proj": "w8a8_dynamic", "model.layers.1.self_attn.q_proj": "w8a8_dynamic",
                      "model.layers.2.self_attn.q_proj": "w4a8_dynamic", "model.layers.0.mlp.up_proj": "w4a8_dynamic"}
    assert fake_quant.scheme_for("model.layers.0.mlp.gate", config) is None


def test_brace_globs_expand_to_lists_and_numeric_ranges():
    assert expand_braces("model.layers.{1,2}.mlp.*") == ["model.layers.1.mlp.*", "model.layers.2.mlp.*"]
    assert expand_braces("layers.{0..2}.q") == ["layers.0.q", "layers.1.q", "layers.2.q"]
    assert expand_braces("*{up,gate{,_up}}_proj") == ["*up_proj", "*gate_proj", "*gate_up_proj"]
    assert expand_braces("*q_proj") == ["*q_proj"]


def test_a_glob_into_per_expert_linears_also_selects_slimcs_fused_experts_module():
    text = W8A8_DYNAMIC.replace('include: ["*"]', 'include: ["*mlp.experts.*", "*shared_experts.*"]')
    data, notes, _, _ = convert(text)
    rule = data["pipeline"][0]["rules"][0]
    assert rule["include"] == ["*mlp.experts.*", "*mlp.experts", "*shared_experts.*"] and rule["optional"] is True
    assert any("glob '*mlp.experts.*' also given as '*mlp.experts'" in n for n in notes)


def test_flex_smooth_quant_without_alpha_and_beta_searches_alpha_and_names_beta():
    data, notes, _, _ = convert(with_process('- type: "flex_smooth_quant"\n  enable_subgraph_type: ["norm-linear", "ov"]\n'))
    assert data["pipeline"][0] == {"pass": "smooth", "search": True, "subgraphs": ["norm-linear", "v-o"]}
    assert ("spec.process[0] (type: flex_smooth_quant): mapped to smooth with search: true (slimc searches alpha per "
            "group for the lowest quantized block error; flex_smooth_quant's beta has no equivalent)") in notes


def test_gptq_weights_with_groups_select_gptq_in_calibrate():
    text = W8A8_DYNAMIC.replace(
        'weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}',
        'weight: {scope: "per_group", dtype: "int4", symmetric: True, method: "gptq", ext: {group_size: 64, percdamp: 0.05}}',
    ).replace('act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}', "")
    data, _, config, _ = convert(text)
    assert data["schemes"]["w4a16"]["weight"]["group_size"] == 64
    assert data["pipeline"][1] == {"pass": "calibrate", "weight_algorithm": "gptq", "gptq": {"damp": 0.05, "act_order": False}}
    assert config.schemes["w4a16"].label == "W4A16"


def test_histogram_activations_get_the_mse_observer_with_a_note():
    text = W8A8_STATIC_ITER_SMOOTH.replace('symmetric: False, method: "minmax"', 'symmetric: False, method: "histogram"')
    data, notes, _, _ = convert(text)
    assert data["schemes"]["w8a8_static"]["act"]["observer"] == "mse"
    assert any(n.startswith("spec.process[1] (type: linear_quant): qconfig.act.method histogram") for n in notes)


def test_part_file_size_becomes_max_shard_size_in_gib_and_zero_means_one_file():
    data, _, _, _ = convert(W8A8_DYNAMIC.replace("part_file_size: 4", "part_file_size: 8"))
    assert data["export"] == [{"format": "mindie", "max_shard_size": "8GiB"}]
    data, _, _, _ = convert(W8A8_DYNAMIC.replace("part_file_size: 4", "part_file_size: 0"))
    assert data["export"] == [{"format": "mindie"}]
    data, _, _, _ = convert(W8A8_DYNAMIC.replace('"ascendv1_saver"', '"compressed_tensors"'))
    assert data["export"] == [{"format": "vllm", "max_shard_size": "4GiB"}]


def test_multimodal_vlm_apiversion_calibrates_on_image_text():
    text = W8A8_DYNAMIC.replace("apiversion: modelslim_v1", "apiversion: multimodal_vlm_modelslim_v1")
    data, notes, _, _ = convert(text + '  default_text: "Describe this image in detail."\n')
    assert data["calibration"] == {"dataset": "builtin:image-text"}
    assert "spec.default_text: not converted: builtin:image-text pairs every image with its own text" in notes


def test_diffusion_apiversion_calibrates_on_prompts():
    text = W8A8_DYNAMIC.replace("apiversion: modelslim_v1", "apiversion: multimodal_sd_modelslim_v1")
    data, _, _, _ = convert(text)
    assert data["calibration"] == {"dataset": "builtin:prompts", "samples": 16, "batch_size": 1}


def test_online_quarot_becomes_rotate_inputs_before_fake_quant():
    data, _, _, _ = convert(with_process('- type: "online_quarot"\n  include: ["*"]\n  exclude: ["*norm1.linear"]\n'))
    assert data["pipeline"][0] == {"pass": "rotate_inputs", "include": ["*"], "exclude": ["*norm1.linear"]}
    assert passes(data)[1] == "fake_quant"


def test_dynamic_cache_becomes_fake_quants_int8_kv_cache():
    data, notes, config, _ = convert(with_process(
        '- type: "dynamic_cache"\n  qconfig: {scope: "per_channel", dtype: "int8", symmetric: False, method: "minmax"}\n'
        '  include: ["*layers.1.*"]\n'))
    fake_quant = next(step for step in data["pipeline"] if step["pass"] == "fake_quant")
    assert fake_quant["kv_cache"] == {"dtype": "int8", "granularity": "per_channel", "symmetric": False}
    assert config.pipeline[0].kv_cache.symmetric is False
    assert ("spec.process[0] (type: dynamic_cache): include / exclude: every attention of the text decoder gets an int8 "
            "KV cache") in notes


def test_a_dynamic_cache_of_another_dtype_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="the KV cache is quantized to int8 per_channel only"):
        convert(with_process('- type: "dynamic_cache"\n  qconfig: {scope: "per_tensor", dtype: "int8", symmetric: True, '
                             'method: "minmax"}\n'))


# --- what does not convert ------------------------------------------------------------------------------


def test_unmappable_parts_are_each_named_in_a_note_and_the_rest_still_converts():
    text = with_process(
        '- type: "kv_smooth"\n',
        '- type: "fa3_quant"\n  include: ["*"]\n',
        '- type: "float_sparse"\n  sparse_ratio: 0.4\n',
        '- type: "my_secret_quant"\n',
        '- type: "linear_quant"\n'
        '  qconfig:\n'
        '    act: {scope: "per_block", dtype: "mxfp8", symmetric: True, method: "minmax"}\n'
        '    weight: {scope: "per_block", dtype: "mxfp8", symmetric: True, method: "minmax"}\n'
        '  include: ["*visual*"]\n',
    )
    data, notes, _, _ = convert(text)
    assert [rule["scheme"] for rule in data["pipeline"][0]["rules"]] == ["w8a8_dynamic"]
    assert ("spec.process[0] (type: kv_smooth): not converted: smoothing for KV-cache quantization, which slimc does "
            "not do") in notes
    assert ("spec.process[1] (type: fa3_quant): not converted: FlashAttention (FA3) quantization; slimc has no attention "
            "quantization, attention stays float") in notes
    assert "spec.process[2] (type: float_sparse): not converted: sparsity; slimc does not prune, weights stay dense" in notes
    assert any(n.startswith("spec.process[3] (type: my_secret_quant): not converted: not a msModelSlim V1 processor")
               for n in notes)
    assert ("spec.process[4] (type: linear_quant): not converted: weight mxfp8 per_block, act mxfp8 per_block has no slimc "
            "equivalent (slimc quantizes to int8 / int4); the layers it selects stay float. Nearest slimc scheme: "
            "w8a8_dynamic") in notes


def test_mixed_gptq_and_minmax_steps_note_that_gptq_rounds_every_layer():
    text = OVERLAPPING.replace(
        'weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "minmax"}',
        'weight: {scope: "per_channel", dtype: "int4", symmetric: True, method: "gptq"}',
    )
    data, notes, _, _ = convert(text)
    assert data["pipeline"][1]["weight_algorithm"] == "gptq"
    assert ("spec.process[0].configs[0] (type: linear_quant): weights rounded by GPTQ as well: calibrate's "
            "weight_algorithm is one for all layers and spec.process[0].configs[1] (type: linear_quant) asks for GPTQ") in notes



def test_autoround_quant_converts_to_calibrate_with_autoround_for_its_iterations():
    text = """\
apiversion: modelslim_v1
spec:
  process:
    - type: "autoround_quant"
      iters: 50
      strategies:
        - qconfig:
            act: {scope: "per_token", dtype: "int8", symmetric: True, method: "minmax"}
            weight: {scope: "per_channel", dtype: "int8", symmetric: True, method: "minmax"}
          include: ["*"]
          exclude: ["*mlp.gate", "lm_head"]
"""
    data, notes, _, _ = convert(text)
    calibrate = next(step for step in data["pipeline"] if step["pass"] == "calibrate")
    assert calibrate["weight_algorithm"] == "autoround" and calibrate["autoround"] == {"iterations": 50}
    assert ("spec.process[0] (type: autoround_quant): weights rounded by AutoRound (calibrate weight_algorithm: "
            "autoround, 50 iterations); its other settings are slimc's defaults (docs/lowbit.md)") in notes

# --- what is refused ----------------------------------------------------------------------------------


def test_a_config_without_apiversion_is_refused_with_the_expected_values():
    text = W8A8_DYNAMIC.replace("apiversion: modelslim_v1\n", "")
    with pytest.raises(ConfigError, match=r"^m.yaml: apiversion: required key is missing; expected one of modelslim_v1, "
                                          r"multimodal_vlm_modelslim_v1, multimodal_sd_modelslim_v1$"):
        convert(text)


def test_a_v0_config_is_refused_as_the_older_schema():
    with pytest.raises(ConfigError, match=r"apiversion: 'modelslim_v0' is not a V1 apiversion \(modelslim_v0 is the older"):
        convert("apiversion: modelslim_v0\nspec: {calib_cfg: {w_bit: 8}}\n")


def test_a_config_without_process_is_refused():
    with pytest.raises(ConfigError, match=r"m.yaml: spec.process: expected a list of processors"):
        convert("apiversion: modelslim_v1\nspec: {save: [{type: ascendv1_saver}]}\n")


def test_a_config_without_linear_quant_is_refused_naming_the_types_found():
    with pytest.raises(ConfigError, match=r"m.yaml: spec.process: no linear_quant \(types found: float_sparse\)"):
        convert("apiversion: modelslim_v1\nspec: {process: [{type: float_sparse, sparse_ratio: 0.4}]}\n")


def test_a_qconfig_missing_a_key_is_refused_naming_the_key():
    text = W8A8_DYNAMIC.replace('weight: {scope: "per_channel", ', "weight: {")
    with pytest.raises(ConfigError, match=r"^m.yaml: spec.process\[0\] \(type: linear_quant\): qconfig.weight.scope: "
                                          r"required key is missing"):
        convert(text)


def test_a_qconfig_with_an_unknown_dtype_is_refused_with_the_allowed_values():
    text = W8A8_DYNAMIC.replace('dtype: "int8", symmetric: True, method: "minmax"}\n      include', 'dtype: "int3", '
                                'symmetric: True, method: "minmax"}\n      include')
    with pytest.raises(ConfigError, match=r"qconfig.weight.dtype: 'int3' is not one of int8, int4, float, mxfp8"):
        convert(text)


def test_a_linear_quant_without_qconfig_is_refused():
    with pytest.raises(ConfigError, match=r"spec.process\[0\] \(type: linear_quant\): qconfig: expected a mapping"):
        convert("apiversion: modelslim_v1\nspec: {process: [{type: linear_quant, include: ['*']}]}\n")


def test_reading_a_missing_non_utf8_invalid_or_non_mapping_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml"):
        read_msmodelslim(tmp_path / "missing.yaml")
    cases = {"latin1.yaml": b"apiversion: modelslim_v1 # \xe9\n", "bad.yaml": b"spec: [unclosed\n", "list.yaml": b"- 1\n"}
    messages = {"latin1.yaml": " is not UTF-8 text", "bad.yaml": ": not valid YAML", "list.yaml": ": a msModelSlim config is a mapping"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"{tmp_path / name}{messages[name]}"):
            read_msmodelslim(tmp_path / name)


# --- end to end ----------------------------------------------------------------------------------------


def test_the_converted_w8a8_dynamic_config_compiles_a_tiny_llama_to_mindie(tmp_path, tiny_llama_dir, one_torch_thread):
    data, _, _, _ = convert(W8A8_DYNAMIC)
    data["calibration"].update(samples=4, seq_len=32, batch_size=2)
    with pytest.warns(UserWarning, match="below the recommended"):
        compile_model(config_from_data(data), model_path=str(tiny_llama_dir), out_dir=tmp_path / "out")
    description = json.loads((tmp_path / "out" / "mindie" / "quant_model_description.json").read_text())
    assert description["model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert list((tmp_path / "out" / "mindie").glob("quant_model_weights*.safetensors"))
