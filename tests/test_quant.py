"""Quantization numerics against plain reference formulas."""

import pytest
import torch

from slimc.numerics import int_mm, quant
from slimc.numerics.calib import activation_channel_absmax
from slimc.numerics.modules import FakeQuantize, QuantizedExperts, QuantizedLinear, float_matmuls
from slimc.numerics.observers import Observer
from slimc.numerics.quant import (
    dequantize_weight,
    dynamic_fake_quantize,
    fake_quantize_weight,
    pack_int4,
    qparams_from_range,
    quantize_weight,
    smoothing_scales,
    unpack_int4,
)
from slimc.schemes import QuantScheme, TensorScheme


def test_symmetric_int8_per_channel_matches_the_textbook_formula():
    w = torch.randn(16, 32)
    scheme = TensorScheme(dtype="int8", granularity="per_channel")
    codes, scale, offset = quantize_weight(w, scheme)
    expected_scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(scale, expected_scale)
    assert torch.equal(codes, torch.clamp(torch.round(w / expected_scale), -128, 127).to(torch.int8))
    assert torch.all(offset == 0)


def test_asymmetric_int8_follows_the_ascend_offset_convention():
    x = torch.tensor([-1.0, 0.5, 3.0])
    scheme = TensorScheme(dtype="int8", granularity="per_tensor", symmetric=False)
    scale, offset = qparams_from_range(x.min(), x.max(), scheme)
    assert torch.isclose(scale, torch.tensor(4.0 / 255))
    assert offset == torch.round(torch.tensor(1.0) / scale) - 128


def test_dequantized_weight_error_is_bounded_by_half_a_step():
    w = torch.randn(8, 64)
    for scheme in (
        TensorScheme(dtype="int8", granularity="per_channel"),
        TensorScheme(dtype="int4", granularity="per_group", group_size=16, symmetric=False),
        TensorScheme(dtype="int4", granularity="per_tensor"),
    ):
        codes, scale, offset = quantize_weight(w, scheme)
        error = (dequantize_weight(codes, scale, offset, scheme) - w).abs()
        step = scale.repeat_interleave(16, 1) if scheme.granularity == "per_group" else scale
        assert torch.all(error <= step / 2 + 1e-6)


def test_int4_codes_stay_in_range_and_pack_round_trips():
    w = torch.randn(4, 32) * 10
    codes, _, _ = quantize_weight(w, TensorScheme(dtype="int4", granularity="per_channel", observer="mse"))
    assert codes.min() >= -8 and codes.max() <= 7
    packed = pack_int4(codes)
    assert packed.shape == (4, 16) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), codes)


def test_mse_observer_never_has_larger_error_than_minmax():
    w = torch.randn(32, 128)
    w[:, 0] *= 30  # an outlier column
    minmax = TensorScheme(dtype="int4", granularity="per_channel")
    mse = TensorScheme(dtype="int4", granularity="per_channel", observer="mse")
    err_minmax = (dequantize_weight(*quantize_weight(w, minmax), minmax) - w).pow(2).sum()
    err_mse = (dequantize_weight(*quantize_weight(w, mse), mse) - w).pow(2).sum()
    assert err_mse <= err_minmax


def test_per_token_dynamic_quantization_uses_each_tokens_own_range():
    x = torch.tensor([[0.1, -0.2, 0.05], [100.0, -50.0, 25.0]])
    scheme = TensorScheme(dtype="int8", granularity="per_token", dynamic=True)
    out = dynamic_fake_quantize(x, scheme)
    assert torch.allclose(out[0], x[0], atol=0.2 / 127)
    assert torch.allclose(out[1], x[1], atol=100.0 / 127)


def test_percentile_observer_clips_outliers_that_minmax_keeps():
    torch.manual_seed(0)
    values = torch.randn(100_000)
    values[0] = 1000.0
    minmax = Observer(TensorScheme(granularity="per_tensor"))
    percentile = Observer(TensorScheme(granularity="per_tensor", observer="percentile", percentile=99.9))
    for observer in (minmax, percentile):
        observer.update(values)
    assert minmax.qparams()[0] > 10 * percentile.qparams()[0]


def test_static_fake_quantize_observes_then_applies_its_frozen_scale():
    quantizer = FakeQuantize(TensorScheme(granularity="per_tensor", symmetric=False))
    x = torch.linspace(-1, 3, 50)
    assert torch.equal(quantizer(x), x)
    quantizer.freeze()
    assert quantizer.mode == "quantize"
    assert torch.isclose(quantizer.scale, torch.tensor([4.0 / 255]))
    assert (quantizer(x) - x).abs().max() <= quantizer.scale / 2 + 1e-6


def test_smoothing_scales_balance_activation_and_weight_ranges():
    act = torch.tensor([100.0, 1.0, 0.0])
    weight = torch.tensor([1.0, 1.0, 2.0])
    scales = smoothing_scales(act, weight, alpha=0.5)
    assert torch.allclose(scales[:2], torch.tensor([10.0, 1.0]))
    assert scales[2] == 1.0  # a dead channel is left alone


@pytest.mark.parametrize(
    ("weight", "act", "message"),
    [
        ({"granularity": "per_group"}, None, "group_size"),
        ({"dynamic": True}, None, "dynamic is for activations"),
        ({}, {"granularity": "per_token"}, "dynamic: true"),
        ({}, {"granularity": "per_channel", "dynamic": True}, "per_channel activations"),
    ],
)
def test_inconsistent_schemes_are_rejected_with_the_reason(weight, act, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(weight=weight, act=act)


def test_scheme_labels_use_ascend_names():
    w8 = {"dtype": "int8"}
    assert QuantScheme(weight=w8, act={"granularity": "per_token", "dynamic": True}).label == "W8A8_DYNAMIC"
    assert QuantScheme(weight=w8, act={"granularity": "per_tensor"}).label == "W8A8"
    assert QuantScheme(weight=w8).label == "W8A16"
    assert QuantScheme(weight={"dtype": "int4"}, act={"dtype": "int4", "granularity": "per_token", "dynamic": True}).label == "W4A4_DYNAMIC"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", [
    TensorScheme(dtype="int8", granularity="per_channel"),
    TensorScheme(dtype="int8", granularity="per_channel", symmetric=False, observer="mse"),
    TensorScheme(dtype="int4", granularity="per_group", group_size=16, symmetric=False),
    TensorScheme(dtype="int4", granularity="per_group", group_size=16, observer="percentile", percentile=99.0),
    TensorScheme(dtype="int8", granularity="per_tensor"),
], ids=lambda s: f"{s.dtype}-{s.granularity}-{'sym' if s.symmetric else 'asym'}-{s.observer}")
def test_fake_quantized_weight_is_the_dequantized_codes_row_chunk_by_row_chunk(scheme, dtype, monkeypatch):
    monkeypatch.setattr(quant, "FAKE_QUANT_CHUNK", 3 * 64 + 5)  # chunks of 3 rows: the last one short
    w = (torch.randn(20, 64) * torch.rand(64) * 3).to(dtype)
    expected = dequantize_weight(*quantize_weight(w, scheme), scheme).to(dtype)
    got = fake_quantize_weight(w, scheme)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("scheme", [
    TensorScheme(dtype="int8", granularity="per_tensor"),
    TensorScheme(dtype="int4", granularity="per_token", dynamic=True),
], ids=lambda s: f"{s.dtype}-{s.granularity}")
def test_symmetric_fake_quantize_equals_the_round_trip_through_a_zero_offset(scheme):
    x = torch.randn(4, 64) * 3
    x[0, :8] = torch.tensor([-1e-4, 1e-4, -0.0, 0.0, 5.0, -5.0, 1e-3, -1e-3])  # codes of -0 and 0, and the extremes
    scale, offset = qparams_from_range(*quant.act_range(x, scheme), scheme)
    expected = (torch.clamp(torch.round(x / scale + offset), scheme.qmin, scheme.qmax) - offset) * scale
    assert torch.equal(quant.fake_quantize(x, scale, offset, scheme), expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_fake_quantize_is_the_textbook_round_trip(symmetric):
    x = torch.randn(2, 5, 32) * 4 + (0 if symmetric else 1)
    scheme = TensorScheme(dtype="int8", granularity="per_token", symmetric=symmetric, dynamic=True)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale, offset = torch.maximum(-low, high) / 127, torch.zeros(())
    else:
        scale = (high - low) / 255
        offset = torch.round(-low / scale) - 128
    codes = torch.clamp(torch.round(x / scale + offset), -128, 127)
    assert torch.equal(dynamic_fake_quantize(x, scheme), (codes - offset) * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_channel_absmax_is_the_maximum_of_the_absolute_values_per_channel(dtype):
    x = (torch.randn(3, 7, 16) * torch.rand(16) * 5).to(dtype)
    x[..., 0] = -x[..., 0].abs()  # a channel of negative values only
    x[..., 1] = 0.0
    got = activation_channel_absmax(x)
    assert got.dtype == torch.float32 and torch.equal(got, x.abs().float().reshape(-1, 16).amax(0))


INTEGER_SCHEMES = [
    QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_token", dynamic=True)),
    QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_token", symmetric=False, dynamic=True)),
    QuantScheme(weight=TensorScheme(), act=TensorScheme(granularity="per_tensor", symmetric=False)),
    QuantScheme(weight=TensorScheme(dtype="int4"), act=TensorScheme(dtype="int4", granularity="per_token", dynamic=True)),
    QuantScheme(weight=TensorScheme(granularity="per_tensor"), act=TensorScheme(granularity="per_token", dynamic=True)),
]


def lowered_layer(scheme: QuantScheme, in_features: int, out_features: int, dtype: torch.dtype) -> QuantizedLinear:
    torch.manual_seed(3)
    codes, scale, offset = quantize_weight(torch.randn(out_features, in_features) * torch.rand(in_features), scheme.weight)
    input_qparams = None if scheme.act.dynamic else (torch.tensor([0.05]), torch.tensor([7.0]))
    return QuantizedLinear(scheme, codes, scale, offset, torch.randn(out_features), input_qparams, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", INTEGER_SCHEMES, ids=lambda s: s.label + ("" if s.act.symmetric else "-asym") + f"-{s.weight.granularity}")
def test_lowered_layers_sum_integer_products_exactly_and_the_float_path_within_its_rounding(scheme, dtype):
    """The integer matmul is the codes' products summed exactly, then scaled: it equals that sum taken in float64
    up to the float32 scaling after it. The float path (dequantized values multiplied in float32) agrees with it
    within float32 accumulation error."""
    layer = lowered_layer(scheme, in_features=1536, out_features=96, dtype=dtype)
    x = (torch.randn(3, 40, 1536) * 2 + 0.5).to(dtype)
    act = scheme.act
    codes, scale, offset = quant.activation_codes(x, act, layer.input_scale, layer.input_offset)
    products = (codes.double() - offset.double()) @ layer.weight.double().T
    exact = products * scale.double() * layer.weight_scale.double().reshape(1, -1) + layer.bias.double()
    exact = exact.reshape(3, 40, 96)

    assert quant.integer_products(act, scheme.weight, 1536)
    integer = layer(x)
    with float_matmuls(layer):
        with float_matmuls(layer):  # nested: the outer one still holds after the inner
            pass
        dequantized = layer(x)
    assert layer.integer_matmul and torch.equal(layer(x), integer)
    assert integer.dtype == dequantized.dtype == dtype

    def error(y):
        return float((y.double() - exact).norm() / exact.norm())
    if dtype == torch.float32:
        assert float((integer.double() - exact).abs().max() / exact.abs().max()) < 1e-6
        assert error(integer) <= error(dequantized) < 1e-5
    else:  # both rounded to bfloat16 at the end
        assert error(integer) < 4e-3 and error(dequantized) < 4e-3


def test_integer_products_only_where_the_scales_factor_out_and_int32_holds_the_sum():
    dynamic8 = TensorScheme(granularity="per_token", dynamic=True)
    asymmetric8 = TensorScheme(granularity="per_tensor", symmetric=False)
    assert not quant.integer_products(None, TensorScheme(), 64)
    assert not quant.integer_products(dynamic8, TensorScheme(dtype="int4", granularity="per_group", group_size=32), 64)
    assert not quant.integer_products(dynamic8, TensorScheme(symmetric=False), 64)
    assert quant.integer_products(dynamic8, TensorScheme(), 131_000)  # 128 · 128 · 131,000 < 2³¹
    assert not quant.integer_products(dynamic8, TensorScheme(), 132_000)
    assert quant.integer_products(asymmetric8, TensorScheme(), 65_000)  # the offset term doubles the bound
    assert not quant.integer_products(asymmetric8, TensorScheme(), 66_000)


def test_lowered_experts_compute_each_expert_as_a_lowered_layer_does():
    scheme = INTEGER_SCHEMES[0]
    torch.manual_seed(4)
    num_experts, hidden, inner = 3, 64, 32
    tensors = {}
    for name, shape in (("gate_up_proj", (num_experts, 2 * inner, hidden)), ("down_proj", (num_experts, hidden, inner))):
        codes, scale, offset = zip(*(quantize_weight(torch.randn(shape[1:]), scheme.weight) for _ in range(num_experts)))
        tensors[name], tensors[f"{name}_scale"], tensors[f"{name}_offset"] = map(torch.stack, (codes, scale, offset))
    experts = QuantizedExperts(scheme, torch.nn.SiLU(), torch.float32, tensors)
    x = torch.randn(10, hidden)
    top_k_index = torch.tensor([[0, 2]] * 5 + [[1, 2]] * 5)
    top_k_weights = torch.rand(10, 2)
    integer = experts(x, top_k_index, top_k_weights)
    with float_matmuls(experts):
        dequantized = experts(x, top_k_index, top_k_weights)
    expected = torch.zeros_like(x)
    for expert in range(num_experts):
        gate_up = lowered_layer_of(experts, scheme, "gate_up_proj", expert)
        down = lowered_layer_of(experts, scheme, "down_proj", expert)
        gate, up = gate_up(x).chunk(2, dim=-1)
        routed = (top_k_index == expert).float() * top_k_weights
        expected += down(torch.nn.functional.silu(gate) * up) * routed.sum(dim=1, keepdim=True)
    assert torch.allclose(integer, expected, rtol=1e-5, atol=1e-5)
    assert float((dequantized - integer).norm() / integer.norm()) < 1e-5


def lowered_layer_of(experts: QuantizedExperts, scheme: QuantScheme, which: str, expert: int) -> QuantizedLinear:
    return QuantizedLinear(scheme, getattr(experts, which)[expert], getattr(experts, f"{which}_scale")[expert],
                           getattr(experts, f"{which}_offset")[expert], None, None, torch.float32)


def saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An int8 matmul as x86 CPUs without VNNI compute it: (a + 128) × b in pairs summed in 16 bits, saturating,
    then the 128 · Σb compensation."""
    products = (a.long() + 128)[:, None, :] * b.t().long()[None, :, :]
    pairs = (products[..., 0::2] + products[..., 1::2]).clamp(-32768, 32767)
    return (pairs.sum(-1) - 128 * b.long().sum(0)[None, :]).int()


def refused_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("_int_mm: not implemented for this CPU")


@pytest.mark.parametrize("kernel", [saturating_int_mm, refused_int_mm], ids=["saturating", "missing"])
def test_lowered_layers_multiply_in_float_where_this_cpus_int8_matmul_is_not_exact(monkeypatch, kernel):
    layer = lowered_layer(INTEGER_SCHEMES[0], in_features=64, out_features=24, dtype=torch.float32)
    x = torch.randn(5, 64)
    with float_matmuls(layer):
        expected = layer(x)
    monkeypatch.setattr(torch, "_int_mm", kernel)
    int_mm.exact_on_this_cpu.cache_clear()
    try:
        assert not int_mm.integer_matmul_available(torch.device("cpu"))
        assert torch.equal(layer(x), expected)
    finally:
        int_mm.exact_on_this_cpu.cache_clear()
