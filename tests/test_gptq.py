"""GPTQ: error feedback through the input Hessian beats round-to-nearest, stays on the format's grid."""

import copy

import pytest
import torch
from conftest import save_tiny_model
from programs import calibration_ids, run_pipeline
from safetensors.torch import load_file
from test_streaming import same_files
from tiny_models import tiny_causal_lm

from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import PassError
from slimc.numerics import gptq
from slimc.numerics.gptq import HessianAccumulator, QuantizedInputAccumulator, gptq_quantize
from slimc.numerics.quant import dequantize_weight, dynamic_fake_quantize, quantize_weight
from slimc.schemes import TensorScheme

INT4_CHANNEL = TensorScheme(dtype="int4")
INT4_G32 = TensorScheme(dtype="int4", granularity="per_group", group_size=32)
INT4_G32_ASYM = TensorScheme(dtype="int4", granularity="per_group", group_size=32, symmetric=False)
INT4_CHANNEL_MSE = TensorScheme(dtype="int4", observer="mse")
INT4_PER_TOKEN = TensorScheme(dtype="int4", granularity="per_token", dynamic=True)


def correlated_inputs_with_outliers(tokens: int = 2048, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Layer inputs like a transformer's: correlated channels, a few of them much larger."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator) @ torch.randn(features, features, generator=generator) / features**0.5
    x[:, :3] *= 25.0
    return x


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    reference = x @ weight.T
    return float((x @ quantized.T - reference).norm() / reference.norm())


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator()
    for chunk in x.split(500):
        accumulator.add(chunk)
    return accumulator.hessian()


@pytest.mark.parametrize("scheme", [INT4_CHANNEL, INT4_G32, INT4_G32_ASYM, INT4_CHANNEL_MSE])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_of_rtn_on_a_layer_with_outliers(scheme, act_order):
    x = correlated_inputs_with_outliers()
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    rtn = dequantize_weight(*quantize_weight(weight, scheme), scheme)
    gptq = dequantize_weight(*gptq_quantize(weight, hessian_of(x), scheme, act_order=act_order), scheme)
    assert output_error(x, weight, gptq) < 0.7 * output_error(x, weight, rtn)


def test_hessian_accumulates_two_over_n_x_transpose_x():
    x = torch.randn(300, 16, dtype=torch.float32)
    assert torch.allclose(hessian_of(x), 2.0 / 300 * x.T @ x, rtol=1e-5, atol=1e-5)


def test_the_quantized_input_statistics_are_the_hessian_of_the_quantized_inputs_and_the_least_squares_correction():
    x = correlated_inputs_with_outliers(tokens=1000, features=32).double()
    quantized = dynamic_fake_quantize(x.float(), INT4_PER_TOKEN).double()
    accumulator = QuantizedInputAccumulator(lambda inputs: dynamic_fake_quantize(inputs, INT4_PER_TOKEN))
    for chunk in x.split(300):
        accumulator.add(chunk)
    assert torch.allclose(accumulator.hessian(), (2.0 / 1000 * quantized.T @ quantized).float(), rtol=1e-5, atol=1e-5)
    weight = torch.randn(8, 32, dtype=torch.float64)
    # the weight that maps the quantized inputs closest to the float outputs, to the damping's bias
    least_squares = torch.linalg.lstsq(quantized, x @ weight.T).solution.T
    corrected = weight.float() @ accumulator.input_correction(damp=1e-9)
    assert torch.allclose(corrected.double(), least_squares, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(corrected.double(), weight, rtol=1e-2, atol=1e-2)


def test_gptq_on_quantized_inputs_lowers_the_error_the_layer_makes_on_them():
    """What the layer computes at run time, Q(W) on quantized inputs, against its float output: GPTQ of the corrected
    weight on the quantized inputs' Hessian beats GPTQ on the float inputs' and GPTQ on the quantized inputs' alone."""
    x = correlated_inputs_with_outliers(tokens=4096)
    quantized = dynamic_fake_quantize(x, INT4_PER_TOKEN)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    accumulator = QuantizedInputAccumulator(lambda inputs: dynamic_fake_quantize(inputs, INT4_PER_TOKEN))
    for chunk in x.split(500):
        accumulator.add(chunk)
    reference = x @ weight.T

    def run_time_error(candidate: torch.Tensor, hessian: torch.Tensor) -> float:
        codes = dequantize_weight(*gptq_quantize(candidate, hessian, INT4_CHANNEL, act_order=True), INT4_CHANNEL)
        return float((quantized @ codes.T - reference).norm() / reference.norm())

    quantized_hessian = accumulator.hessian()
    on_float_inputs = run_time_error(weight, hessian_of(x))
    on_quantized_inputs = run_time_error(weight, quantized_hessian)
    corrected = run_time_error(weight @ accumulator.input_correction(damp=0.01), quantized_hessian)
    assert corrected < 0.9 * min(on_float_inputs, on_quantized_inputs)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    weight = torch.randn(16, 64)
    codes, scale, offset = gptq_quantize(weight, torch.diag(torch.rand(64) + 0.5), INT4_CHANNEL)
    rtn_codes, rtn_scale, rtn_offset = quantize_weight(weight, INT4_CHANNEL)
    assert torch.equal(codes, rtn_codes) and torch.equal(scale, rtn_scale) and torch.equal(offset, rtn_offset)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_returns_codes_and_scales_in_the_stored_layout(act_order):
    weight = torch.randn(32, 128)
    codes, scale, offset = gptq_quantize(weight, hessian_of(correlated_inputs_with_outliers()), INT4_G32_ASYM, act_order=act_order)
    assert codes.dtype == torch.int8 and codes.shape == (32, 128)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scale.shape == offset.shape == (32, 4)
    assert torch.equal(offset, offset.round())


def test_gptq_ignores_input_channels_that_are_always_zero():
    x = correlated_inputs_with_outliers()
    x[:, 10] = 0.0
    codes, scale, offset = gptq_quantize(torch.randn(8, 128), hessian_of(x), INT4_CHANNEL)
    assert torch.equal(codes[:, 10], torch.zeros(8, dtype=torch.int8))


def test_calibrate_with_gptq_lowers_layer_errors_of_a_model_compared_with_rtn():
    schemes = {"w4a16": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 16}}}

    def layer_errors(algorithm: str) -> dict[str, float]:
        pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a16", "exclude": ["*mlp.gate"]}]},
                    {"pass": "calibrate", "weight_algorithm": algorithm}]
        _, report = run_pipeline(tiny_causal_lm("qwen3_moe"), pipeline, schemes=schemes)
        return {layer.name: layer.relative_error for layer in report.layers}

    rtn, gptq = layer_errors("rtn"), layer_errors("gptq")
    assert set(rtn) == set(gptq) and any(name.endswith("mlp.experts") for name in gptq)
    assert sum(gptq.values()) < 0.9 * sum(rtn.values())
    assert all(gptq[name] <= rtn[name] * 1.05 for name in gptq)


def test_a_group_size_that_does_not_divide_a_layer_names_the_layer():
    schemes = {"w4a16": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 48}}}
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a16"}]}, {"pass": "calibrate", "weight_algorithm": "gptq"}]
    with pytest.raises(PassError, match=r"model.layers.0.self_attn.\w+_proj: group_size 48 does not divide the input size 64"):
        run_pipeline(tiny_causal_lm("llama"), pipeline, schemes=schemes)


def gptq_llama():
    """A tiny Llama through fake_quant (W4A8 dynamic: a quantizer node before each Linear) and GPTQ calibrate."""
    schemes = {"w4a8": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 16},
                        "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}}}
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a8"}]}, {"pass": "calibrate", "weight_algorithm": "gptq"}]
    return run_pipeline(tiny_causal_lm("llama"), pipeline, schemes=schemes)[0]


def test_linears_reading_one_input_share_one_hessian_with_the_codes_of_one_hessian_each(monkeypatch):
    import slimc.passes.calibrate as calibrate

    built = []

    class Counted(HessianAccumulator):
        def __init__(self) -> None:
            super().__init__()
            built.append(self)

    monkeypatch.setattr(calibrate, "HessianAccumulator", Counted)
    shared = gptq_llama()
    layers = shared.model.config.num_hidden_layers
    # per decoder layer: the attention norm's output (q, k, v), the attention's (o), the MLP norm's (gate, up), act*up (down)
    assert len(built) == 4 * layers
    monkeypatch.setattr(calibrate, "find_shared_inputs", lambda gm, targets: [[target] for target in targets])
    built.clear()
    separate = gptq_llama()
    assert len(built) == 7 * layers
    for name, spec in shared.quant_specs.items():
        assert torch.equal(spec.weight_qparams["weight"][0], separate.quant_specs[name].weight_qparams["weight"][0]), name
    for (name, weight), (_, reference) in zip(shared.model.named_parameters(), separate.model.named_parameters(), strict=True):
        assert torch.equal(weight, reference), name


@pytest.mark.parametrize("config_name", ["llm/w4a16_gptq.yaml", "llm/w4a4_quarot_gptq.yaml"])
def test_a_shared_hessian_is_factored_once_with_the_codes_of_one_factor_per_linear(tmp_path, monkeypatch, config_name):
    """The Linears reading one input share the factor of its Hessian: one factorization per distinct Hessian of a
    block, and the written files are those of factoring it again for each Linear, byte for byte."""
    import slimc.passes.calibrate as calibrate

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    groups = ["schemes.w4a16.weight.group_size=16"] if "w4a16" in config_name else []  # the tiny widths are 64
    config = load_config(resolve_config_path(config_name),
                         ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2", *groups])
    factored = []

    def counted(hessian, **options):
        factored.append(hessian.shape[0])
        return gptq.factor_hessian(hessian, **options)

    monkeypatch.setattr(calibrate, "factor_hessian", counted)
    with pytest.warns(UserWarning, match="below the recommended"):
        shared = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "shared")
    layers = shared.program.model.config.num_hidden_layers
    # per decoder layer: the attention norm's output (q, k, v), the attention's (o), the MLP norm's (gate, up), act*up (down)
    assert len(factored) == 4 * layers
    unshared = calibrate.Calibrate._quantize_weight
    monkeypatch.setattr(calibrate.Calibrate, "_quantize_weight",
                        lambda self, weight, scheme, hessian, factors: unshared(self, weight, scheme, copy.deepcopy(hessian), {}))
    factored.clear()
    with pytest.warns(UserWarning, match="below the recommended"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "separate")
    assert len(factored) == 7 * layers
    written = sorted((tmp_path / "shared" / "mindie").glob("*.safetensors"))
    assert written
    for file in written:
        ours, theirs = load_file(file), load_file(tmp_path / "separate" / "mindie" / file.name)
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), name


def reference_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The textbook construction in float64: Cholesky, the inverse from it, the inverse's upper Cholesky."""
    h = hessian.double()
    damped = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


@pytest.mark.parametrize("features", [128, 700])
def test_inverse_hessian_factor_is_the_textbook_factor_to_float32_rounding(features):
    """One Cholesky of the reversed Hessian and a triangular solve give the upper factor of the damped inverse."""
    h = hessian_of(correlated_inputs_with_outliers(tokens=4 * features, features=features))
    factor = gptq._inverse_hessian_factor(h, 0.01)
    reference = reference_inverse_factor(h, 0.01)
    assert torch.equal(factor, factor.triu())
    error = (factor.double() - reference).abs().max() / reference.abs().max()
    assert error < 4 * torch.finfo(torch.float32).eps * features**0.5  # measured: 2.5e-7 (128), 4.5e-7 (700)


def test_gptq_with_the_textbook_factor_gives_nearly_the_same_codes(monkeypatch):
    """The factor's float32 rounding moves a few codes across a rounding boundary at most, not the error."""
    x = correlated_inputs_with_outliers()
    h = hessian_of(x)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    codes, scale, offset = gptq_quantize(weight, h, INT4_CHANNEL_MSE, act_order=True)
    monkeypatch.setattr(gptq, "_inverse_hessian_factor", lambda h, damp: reference_inverse_factor(h, damp).float())
    textbook_codes, textbook_scale, textbook_offset = gptq_quantize(weight, h, INT4_CHANNEL_MSE, act_order=True)
    assert torch.equal(scale, textbook_scale) and torch.equal(offset, textbook_offset)
    assert (codes != textbook_codes).float().mean() < 0.01
    ours = output_error(x, weight, dequantize_weight(codes, scale, offset, INT4_CHANNEL_MSE))
    textbook = output_error(x, weight, dequantize_weight(textbook_codes, textbook_scale, textbook_offset, INT4_CHANNEL_MSE))
    assert abs(ours - textbook) < 0.01 * textbook


@pytest.mark.parametrize("size", [5, 700, 1031])
def test_the_upper_triangular_inverse_by_halves_is_the_inverse_to_float32_rounding(size):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, 2 * size, generator=generator, dtype=torch.float64)
    upper = torch.linalg.cholesky(x @ x.T / size + torch.eye(size, dtype=torch.float64), upper=True)
    inverse = gptq.upper_triangular_inverse(upper.float())
    reference = torch.linalg.solve_triangular(upper, torch.eye(size, dtype=torch.float64), upper=True)
    assert torch.equal(inverse, inverse.triu())
    error = (inverse.double() - reference).abs().max() / reference.abs().max()
    assert error < 4 * torch.finfo(torch.float32).eps * size**0.5


def test_the_hessian_is_the_float64_sum_rounded_once_built_by_rows_and_release_frees_the_sum(monkeypatch):
    monkeypatch.setattr(gptq, "HESSIAN_ROWS", 7)  # several row blocks, the last one short
    accumulator = HessianAccumulator()
    accumulator.add(torch.randn(3, 40, 20, generator=torch.Generator().manual_seed(0)))
    expected = (accumulator.sum * (2.0 / accumulator.count)).float()
    assert torch.equal(accumulator.hessian(), expected) and accumulator.sum is not None
    assert torch.equal(accumulator.hessian(release=True), expected) and accumulator.sum is None
    with pytest.raises(ValueError, match="no inputs were seen"):
        accumulator.hessian()


def test_expert_hessians_accumulated_a_few_experts_at_a_time_give_the_codes_of_one_pass(tmp_path, monkeypatch):
    """Fused experts' Hessians come from the routed calls recorded in the calibration run, a chunk of experts at a
    time (`EXPERT_HESSIAN_BYTES`): one expert per chunk writes the files of all experts in one chunk, byte for byte."""
    import slimc.passes.calibrate as calibrate

    model_dir = save_tiny_model(tmp_path / "model", "qwen3_moe")
    config = load_config(resolve_config_path("llm/w4a16_gptq.yaml"),
                         ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                          "schemes.w4a16.weight.group_size=16"])
    chunks = []
    accumulate = calibrate.RoutedCalls.hessians

    def recorded(self, experts, world):
        found = accumulate(self, experts, world)
        chunks.append((len(experts), len(found)))
        return found

    monkeypatch.setattr(calibrate.RoutedCalls, "hessians", recorded)
    with pytest.warns(UserWarning, match="below the recommended"):
        whole = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "whole")
    experts = whole.program.model.config.num_experts
    assert {size for size, _ in chunks} == {experts} and all(found > 0 for _, found in chunks)
    chunks.clear()
    monkeypatch.setattr(calibrate, "EXPERT_HESSIAN_BYTES", 1)
    with pytest.warns(UserWarning, match="below the recommended"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "chunked")
    assert {size for size, _ in chunks} == {1} and max(found for _, found in chunks) == 2  # gate_up and down of one
    assert list((tmp_path / "whole" / "mindie").glob("*.safetensors"))
    assert same_files(tmp_path / "whole", tmp_path / "chunked") == []


def test_routed_calls_give_each_routed_expert_the_hessians_of_its_tokens_and_count_the_others():
    import slimc.passes.calibrate as calibrate
    from slimc.distributed import SINGLE
    from slimc.numerics.modules import FakeQuantExperts

    model = tiny_causal_lm("qwen3_moe")
    experts = FakeQuantExperts(model.model.layers[0].mlp.experts, None)
    routed = calibrate.RoutedCalls(experts)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, experts.gate_up_proj.shape[-1], generator=generator)
    top_k_index = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0]])
    routed.record(experts, (hidden, top_k_index), {"top_k_weights": torch.full((6, 2), 0.5)})
    found = routed.hessians(range(experts.num_experts), SINGLE)
    assert set(found) == {(name, expert) for name in ("gate_up_proj", "down_proj") for expert in (0, 1)}
    assert routed.unrouted == experts.num_experts - 2
    assert torch.allclose(found["gate_up_proj", 0].hessian(), hessian_of(hidden))  # every token reaches expert 0
    gate, up = (hidden @ experts.gate_up_proj[1].T).chunk(2, dim=-1)
    assert torch.allclose(found["down_proj", 1].hessian(), hessian_of(experts.act_fn(gate) * up), rtol=1e-4)
    assert routed.hessians(range(1, 2), SINGLE).keys() == {("gate_up_proj", 1), ("down_proj", 1)}


PER_TOKEN = {"dtype": "int8", "granularity": "per_token", "dynamic": True}
PER_TENSOR_STATIC = {"dtype": "int8", "granularity": "per_tensor", "dynamic": False, "symmetric": False}


def sequential_model(family: str, sequential: bool, kv_cache: bool = False, quantized_inputs: bool = False,
                     act: dict = PER_TOKEN):
    """A tiny model of `family` and its float copy, through GPTQ calibrate with int4 weights and `act` inputs (the
    router left out), sequential or not, with an int8 KV cache or not, fitted to quantized inputs or not."""
    model = tiny_causal_lm(family)
    original = copy.deepcopy(model)
    schemes = {"w4a8": {"weight": {"dtype": "int4", "granularity": "per_channel"}, "act": act}}
    kv = {"kv_cache": {"dtype": "int8", "granularity": "per_channel"}} if kv_cache else {}
    pipeline = [{"pass": "fake_quant", "rules": [{"scheme": "w4a8", "exclude": ["*mlp.gate"]}], **kv},
                {"pass": "calibrate", "weight_algorithm": "gptq",
                 "gptq": {"sequential": sequential, "quantized_inputs": quantized_inputs}}]
    return run_pipeline(model, pipeline, schemes=schemes, batches=calibration_ids(model.config.vocab_size))[0], original


@torch.no_grad()
def inputs_as_run(program, targets: list[str], quantized: bool = False) -> dict[str, HessianAccumulator]:
    """The Hessians of the Linears' inputs (before their input quantizers; with `quantized`, the statistics of those
    inputs as the quantizers quantize them) in a run of the program as calibrated (every weight quantized, every
    quantizer quantizing) on the calibration batches."""
    hessians = {}
    handles = []
    for block in program.blocks:
        for target in targets:
            quantizer = block.input_quantizer(target)
            accumulator = hessians[block.qualified(target)] = (QuantizedInputAccumulator(quantizer.quantize) if quantized
                                                               else HessianAccumulator())
            handles.append(block.input_quantizer(target).register_forward_pre_hook(
                lambda module, args, a=accumulator: a.add(args[0])))
    with program.executing_graphs():
        for ids in calibration_ids(program.model.config.vocab_size):
            program.model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return hessians


@pytest.mark.parametrize(("family", "kv_cache", "later"), [
    ("llama", False, ["self_attn.o_proj", "mlp.down_proj"]),
    ("llama", True, ["self_attn.o_proj", "mlp.down_proj"]),
    ("qwen3_moe", False, ["self_attn.o_proj"]),
])
def test_sequential_gptq_quantizes_each_layer_on_the_inputs_the_quantized_layers_before_it_give(family, kv_cache, later):
    """Sequential GPTQ's o and down projections are GPTQ of the float weights on the Hessian of their inputs with
    everything before them quantized (the KV cache too), which the finished program's own run reproduces; q/k/v
    (nothing quantized before them) come out as without it in the first block (the later blocks' inputs differ),
    the later layers (fused experts too) do not."""
    program, original = sequential_model(family, sequential=True, kv_cache=kv_cache)
    plain, _ = sequential_model(family, sequential=False, kv_cache=kv_cache)
    weights = dict(program.model.named_parameters())
    plain_weights = dict(plain.model.named_parameters())
    scheme = TensorScheme(dtype="int4")
    for name, hessian in inputs_as_run(program, later).items():
        float_weight = original.get_submodule(name).weight
        expected = dequantize_weight(*gptq_quantize(float_weight, hessian.hessian(), scheme, damp=0.01, act_order=True), scheme)
        assert torch.equal(weights[f"{name}.weight"], expected), name
        assert not torch.equal(plain_weights[f"{name}.weight"], expected), name
    for projection in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{projection}.weight"
        assert torch.equal(weights[name], plain_weights[name]), name
    experts = [name for name in weights if "experts" in name]
    assert bool(experts) == (family == "qwen3_moe")
    assert all(not torch.equal(weights[name], plain_weights[name]) for name in experts)


@pytest.mark.parametrize(("family", "act", "sequential", "targets"), [
    ("llama", PER_TOKEN, True, ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("llama", PER_TENSOR_STATIC, True, ["self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]),
    ("llama", PER_TENSOR_STATIC, False, ["self_attn.q_proj", "self_attn.v_proj"]),
    ("qwen3_moe", PER_TOKEN, True, ["self_attn.k_proj", "self_attn.o_proj"]),
])
def test_gptq_with_quantized_inputs_is_gptq_of_the_corrected_weight_on_the_quantized_inputs_as_run(family, act, sequential,
                                                                                                   targets):
    """With `quantized_inputs`, each Linear whose inputs are those of the finished program's run (all with sequential
    GPTQ; q/k/v without) is GPTQ of its float weight times the least-squares correction, on the Hessian of its inputs
    as its input quantizer quantizes them (per token, or per tensor with the calibrated static scale: a run after the
    calibration run), both from that run; without it the weights differ."""
    program, original = sequential_model(family, sequential=sequential, quantized_inputs=True, act=act)
    plain, _ = sequential_model(family, sequential=sequential, act=act)
    weights = dict(program.model.named_parameters())
    plain_weights = dict(plain.model.named_parameters())
    scheme = TensorScheme(dtype="int4")
    for name, statistics in inputs_as_run(program, targets, quantized=True).items():
        corrected = original.get_submodule(name).weight.float() @ statistics.input_correction(0.01)
        expected = dequantize_weight(*gptq_quantize(corrected, statistics.hessian(), scheme, damp=0.01, act_order=True), scheme)
        assert torch.equal(weights[f"{name}.weight"], expected), name
        assert not torch.equal(plain_weights[f"{name}.weight"], expected), name
