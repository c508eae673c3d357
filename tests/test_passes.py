"""The built-in passes: what each promises, checked against the float model or a plain formula."""

import contextlib

import pytest
import torch
from programs import (
    W8A8_DYNAMIC,
    W8A8_STATIC,
    calibration_ids,
    context_of,
    llm_program,
    logits,
    relative,
    run_pipeline,
    simulated_logits,
)
from tiny_models import FAMILIES, tiny_causal_lm
from torch import nn

import slimc.numerics.modules as modules
from slimc.config import config_from_data
from slimc.errors import ConfigError, PassError
from slimc.ir import Block
from slimc.numerics.modules import FakeQuantize, QuantizedExperts, QuantizedLinear
from slimc.pass_base import Pass
from slimc.passes.lower import Lower
from slimc.pipeline import Context, Pipeline
from slimc.plan import QuantPlan

QUANTIZE_ALL = [
    {"pass": "fake_quant", "rules": [{"scheme": "w8", "include": ["*"], "exclude": ["*mlp.gate"]}]},
    {"pass": "calibrate"},
    {"pass": "lower"},
]


def float_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_fusion_makes_norms_scale_free_and_keeps_the_function(family):
    model = tiny_causal_lm(family)
    ids = calibration_ids(model.config.vocab_size, batches=1)[0]
    reference = float_logits(model, ids)
    program, _ = run_pipeline(model, [{"pass": "norm_fusion"}])
    assert torch.all(program.blocks[0].module.input_layernorm.weight == 1.0)
    assert relative(logits(program, ids), reference) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_smooth_moves_scales_into_weights_and_keeps_the_function(family):
    model = tiny_causal_lm(family)
    ids = calibration_ids(model.config.vocab_size, batches=1)[0]
    reference = float_logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    program, _ = run_pipeline(model, [{"pass": "smooth", "alpha": 0.5}])
    assert not torch.allclose(program.blocks[0].module.input_layernorm.weight, norm_before)
    assert not torch.allclose(program.blocks[0].module.self_attn.v_proj.weight, v_before)
    assert relative(logits(program, ids), reference) < 1e-5


def test_smooth_flattens_an_activation_outlier_channel():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 60.0
    program, _ = run_pipeline(model, [{"pass": "smooth", "alpha": 0.5, "subgraphs": ["norm-linear"]}])
    norm = program.blocks[0].module.input_layernorm.weight.abs()
    assert norm[3] / norm.median() < 10


def test_smooth_search_picks_alphas_from_the_grid_and_keeps_the_function():
    model = tiny_causal_lm("qwen2")
    ids = calibration_ids(model.config.vocab_size, batches=1)[0]
    reference = float_logits(model, ids)
    pipeline = [{"pass": "smooth", "search": True, "search_grid": [0.2, 0.6]}, *QUANTIZE_ALL[:1]]
    program, report = run_pipeline(model, pipeline, {"w8": W8A8_STATIC})
    chosen = report.details["smooth_alpha"]
    assert len(chosen) == 8 and set(chosen.values()) <= {0.2, 0.6, None}
    with program.executing_graphs():
        for q in (m for b in program.blocks for m in b.graph_module.modules() if isinstance(m, FakeQuantize)):
            q.mode = "off"
        assert relative(logits(program, ids), reference) < 1e-5


class ScaleFirstLinear(Pass):
    """A pass that claims to preserve the function but does not: the equivalence check must catch it."""

    preserves_function = True
    leaf: str = "self_attn.q_proj"
    factor: float = 1.5

    def run_block(self, block: Block, ctx: Context) -> None:
        with torch.no_grad():
            block.leaf(self.leaf).weight.mul_(self.factor)


class CountLinears(Pass):
    """A user's pass that records what it saw, referenced from YAML by its dotted path."""

    def run_block(self, block: Block, ctx: Context) -> None:
        names = [n for n, m in block.module.named_modules() if isinstance(m, nn.Linear)]
        ctx.report.note(f"{block.name}: {len(names)} Linear layers")


def test_the_equivalence_check_fails_a_pass_that_changes_the_function():
    with pytest.raises(PassError, match=r"changed what block model.layers.0 computes: relative output difference \d"):
        run_pipeline(tiny_causal_lm("llama"), [{"pass": "test_passes:ScaleFirstLinear"}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_equivalence_check_fails_a_wrong_pass_in_half_precision(dtype):
    # o_proj x1.1 moves the block output by 4.5%, above what a half-precision output resolves; q_proj x1.5 moves
    # this random model's output by 0.54%, less than one bfloat16 rounding of it (0.78%), so only float32 sees it.
    wrong = {"pass": "test_passes:ScaleFirstLinear", "leaf": "self_attn.o_proj", "factor": 1.1}
    with pytest.raises(PassError, match=r"relative output difference 4\.5\d*e-02 exceeds the tolerance .* "
                                        r"\(2x the block's .* change under a one-epsilon perturbation of its inputs"):
        run_pipeline(tiny_causal_lm("llama", dtype=dtype), [wrong])


def test_the_equivalence_check_on_one_row_of_the_first_batch_still_fails_a_wrong_pass(monkeypatch):
    """checks.equivalence_tokens: 24 (one row of 24 tokens) runs the check's block calls on that row alone, and a
    pass that changes the function is caught there as on the whole batch."""
    shapes = []
    original = Pipeline._check_call

    def recorded(ctx, rows):
        args, kwargs = call = original(ctx, rows)
        shapes.append(tuple(args[0].shape) if args else tuple(kwargs["hidden_states"].shape))
        return call

    monkeypatch.setattr(Pipeline, "_check_call", staticmethod(recorded))
    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    with pytest.raises(PassError, match=r"changed what block model.layers.0 computes"):
        run_pipeline(tiny_causal_lm("llama"), [{"pass": "test_passes:ScaleFirstLinear"}], batches=batches,
                     checks={"equivalence_tokens": 24})
    assert shapes and {shape[:2] for shape in shapes} == {(1, 24)}  # the reference and the check
    shapes.clear()
    run_pipeline(tiny_causal_lm("llama"), [{"pass": "smooth"}, *QUANTIZE_ALL], {"w8": W8A8_DYNAMIC}, batches=batches,
                 checks={"equivalence_tokens": 48})
    assert shapes and {shape[:2] for shape in shapes} == {(2, 24)}  # smooth's and lower's checks pass on two rows


def test_the_equivalence_tolerance_of_the_config_overrides_the_derived_one():
    wrong = {"pass": "test_passes:ScaleFirstLinear", "leaf": "self_attn.o_proj", "factor": 1.1}
    with pytest.raises(PassError, match=r"exceeds the tolerance 1\.0e-02 \(checks.equivalence_tolerance\)"):
        run_pipeline(tiny_causal_lm("llama", dtype=torch.bfloat16), [wrong], checks={"equivalence_tolerance": 0.01})
    run_pipeline(tiny_causal_lm("llama", dtype=torch.bfloat16), [wrong], checks={"equivalence_tolerance": 0.05})


def test_checks_equivalence_false_turns_the_equivalence_check_off():
    program, _ = run_pipeline(tiny_causal_lm("llama"), [{"pass": "test_passes:ScaleFirstLinear"}],
                              checks={"equivalence": False})
    assert program.blocks[0].leaf("self_attn.q_proj") is not None  # the pass ran on every block unchecked


def test_a_users_pass_runs_by_dotted_path_with_its_typed_parameters():
    _, report = run_pipeline(tiny_causal_lm("llama"), [{"pass": "test_passes:CountLinears"}])
    assert "model.layers.1: 7 Linear layers" in report.notes


def test_fake_quant_rules_later_rule_wins_and_unselected_layers_stay_float():
    schemes = {"w8": W8A8_DYNAMIC, "w8a16": {"weight": {"dtype": "int8"}}}
    rules = [
        {"scheme": "w8", "include": ["*"], "exclude": ["*.o_proj"]},
        {"scheme": "w8a16", "include": ["*down_proj"]},
    ]
    program, _ = run_pipeline(tiny_causal_lm("llama"), [{"pass": "fake_quant", "rules": rules}], schemes)
    specs = program.quant_specs
    assert specs["model.layers.0.self_attn.q_proj"].scheme_name == "w8"
    assert specs["model.layers.0.mlp.down_proj"].scheme_name == "w8a16"
    assert "model.layers.0.self_attn.o_proj" not in specs
    gm = program.blocks[0].graph_module
    quantized_inputs = {n.args[0].target for n in gm.graph.nodes if n.op == "call_module" and n.args and getattr(n.args[0], "op", "") == "call_module" and n.args[0].target.startswith("act_quant.")}
    assert quantized_inputs == {f"act_quant.{t}" for t in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "mlp_gate_proj", "mlp_up_proj")}


def test_calibrate_sets_static_scales_from_the_observed_input_range():
    model = tiny_causal_lm("llama")
    batches = calibration_ids(model.config.vocab_size, batches=3)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    hook.remove()
    x = torch.cat([s.reshape(-1) for s in seen])
    program, _ = run_pipeline(model, QUANTIZE_ALL[:2], {"w8": W8A8_STATIC}, batches=batches)
    quantizer = program.blocks[0].input_quantizer("mlp.down_proj")
    assert quantizer.mode == "quantize"
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    assert torch.allclose(quantizer.scale, (hi - lo) / 255, rtol=1e-5)
    assert quantizer.offset == torch.round(-lo / quantizer.scale) - 128


def test_calibrate_puts_weights_on_the_quantization_grid_and_reports_each_layer_error():
    program, report = run_pipeline(tiny_causal_lm("llama"), QUANTIZE_ALL[:2], {"w8": W8A8_DYNAMIC})
    weight = program.blocks[0].module.mlp.up_proj.weight
    scale, _ = program.quant_specs["model.layers.0.mlp.up_proj"].weight_qparams["weight"]
    codes = weight / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert len(report.layers) == 14 and all(0 < layer.relative_error < 0.05 for layer in report.layers)


@pytest.mark.parametrize("scheme", [W8A8_DYNAMIC, W8A8_STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lowering_computes_what_the_fake_quantized_model_computed(family, scheme):
    """With float matmuls the lowered model computes the fake-quantized values. Its integer matmuls compute each
    layer's output on the same input up to float32 rounding (whose effect on the logits is chaotic: a code a layer
    later can round the other way)."""
    model = tiny_causal_lm(family)
    ids = calibration_ids(model.config.vocab_size, batches=1, seed=5)[0]
    program, _ = run_pipeline(model, QUANTIZE_ALL[:2], {"w8": scheme})
    fake = logits(program, ids)
    for block in program.blocks:
        Lower().run_block(block, context_of(program))
    lowered = simulated_logits(program, ids)
    assert relative(lowered, fake) < 1e-5
    assert any(isinstance(m, QuantizedLinear) for m in program.model.modules())
    assert not any(n.target.startswith("act_quant.") for b in program.blocks for n in b.graph_module.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("lowered", [False, True], ids=["fake_quant", "lowered"])
def test_blocks_reusing_within_runs_compute_the_same_with_fewer_quantizations(monkeypatch, lowered):
    """q, k and v (gate and up) read one activation: within `reusing_within_runs` it is quantized once per call; the
    logits are the same bit for bit. Lowered layers multiply integer codes: no weight is dequantized."""
    program, _ = run_pipeline(tiny_causal_lm("llama"), QUANTIZE_ALL[:2 + lowered], {"w8": W8A8_DYNAMIC})
    ids = calibration_ids(program.model.config.vocab_size, batches=1, seed=5)[0]
    counts = {"quantized": 0, "dequantized": 0}
    quantize = "activation_codes" if lowered else "dynamic_fake_quantize"
    original_quantize, original_dequantize = getattr(modules, quantize), modules.dequantize_weight

    def counted(name, function):
        return lambda *args: counts.__setitem__(name, counts[name] + 1) or function(*args)

    monkeypatch.setattr(modules, quantize, counted("quantized", original_quantize))
    monkeypatch.setattr(modules, "dequantize_weight", counted("dequantized", original_dequantize))
    expected, each = logits(program, ids), dict(counts)
    counts.update(quantized=0, dequantized=0)
    with contextlib.ExitStack() as stack:
        for block in program.blocks:
            stack.enter_context(modules.reusing_within_runs(block.graph_module))
        assert torch.equal(logits(program, ids), expected) and torch.equal(logits(program, ids), expected)
    linears = 7 * len(program.blocks)
    assert each["quantized"] == linears and counts["quantized"] == 2 * 4 * len(program.blocks)  # q k v, o, gate up, down
    assert (each["dequantized"], counts["dequantized"]) == (0, 0)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_moe_experts_are_quantized_per_expert_and_per_row(family):
    program, _ = run_pipeline(tiny_causal_lm(family), QUANTIZE_ALL, {"w8": W8A8_STATIC})
    experts = program.blocks[-1].module.mlp.experts
    assert isinstance(experts, QuantizedExperts)
    num_experts, rows, hidden = experts.gate_up_proj.shape
    assert experts.gate_up_proj.dtype == torch.int8 and experts.gate_up_proj_scale.shape == (num_experts, rows, 1)
    assert experts.down_proj_scale.shape == (num_experts, hidden, 1)
    assert experts.gate_up_input_scale.shape == (num_experts,)
    assert len(set(experts.down_input_scale.tolist())) > 1  # each expert saw its own tokens


def test_route_all_experts_gives_every_expert_its_own_statistics():
    model = tiny_causal_lm("qwen3_moe")
    one_batch = calibration_ids(model.config.vocab_size, batches=1, batch_size=1, seq_len=2)
    pipeline = [QUANTIZE_ALL[0], {"pass": "calibrate", "route_all_experts": True}, QUANTIZE_ALL[2]]
    program, report = run_pipeline(model, pipeline, {"w8": W8A8_STATIC}, batches=one_batch)
    assert not any("saw no calibration tokens" in note for note in report.notes)
    program, report = run_pipeline(tiny_causal_lm("qwen3_moe"), QUANTIZE_ALL, {"w8": W8A8_STATIC}, batches=one_batch)
    assert any("saw no calibration tokens" in note for note in report.notes)


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_keeps_the_tiny_models_close_to_float(family):
    model = tiny_causal_lm(family)
    ids = calibration_ids(model.config.vocab_size, batches=1, seed=9)[0]
    reference = float_logits(model, ids)
    program, _ = run_pipeline(model, [{"pass": "smooth"}, *QUANTIZE_ALL], {"w8": W8A8_DYNAMIC})
    out = logits(program, ids)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


def test_an_optional_rule_may_select_nothing_but_a_required_one_may_not():
    rules = [{"scheme": "w8", "include": ["*"]}, {"scheme": "w8", "include": ["*no_such_layer"], "optional": True}]
    program, _ = run_pipeline(tiny_causal_lm("llama"), [{"pass": "fake_quant", "rules": rules}], {"w8": W8A8_DYNAMIC})
    assert "model.layers.0.mlp.down_proj" in program.quant_specs
    rules[1]["optional"] = False
    with pytest.raises(ConfigError, match=r"glob '\*no_such_layer' matches no quantizable layer"):
        run_pipeline(tiny_causal_lm("llama"), [{"pass": "fake_quant", "rules": rules}], {"w8": W8A8_DYNAMIC})


def test_the_plan_gives_each_layer_in_the_blocks_the_scheme_of_the_first_step_that_assigns_one():
    config = config_from_data({"schemes": {"dynamic": W8A8_DYNAMIC, "static": W8A8_STATIC}, "pipeline": [
        {"pass": "norm_fusion"},
        {"pass": "fake_quant", "rules": [{"scheme": "static", "include": ["*mlp.*"]}]},
        {"pass": "fake_quant", "rules": [{"scheme": "dynamic", "include": ["*"], "exclude": ["*k_proj"]}]},
    ]})
    plan = QuantPlan.resolve(llm_program(tiny_causal_lm("llama")), config, config.pipeline)
    assert plan.scheme("model.layers.0.mlp.down_proj").name == "static"
    assert plan.scheme("model.layers.0.self_attn.q_proj") == ("dynamic", config.schemes["dynamic"])
    assert plan.scheme("model.layers.0.self_attn.k_proj") is None and "model.layers.0.self_attn.k_proj" in plan.float_layers
    assert plan.scheme("lm_head") is None and "lm_head" not in plan.layers  # outside the blocks
