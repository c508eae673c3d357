"""Hadamard numerics against plain references: H Hᵀ = n·I in exact arithmetic, and dense matrix products."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from slimc.errors import PassError
from slimc.numerics.hadamard import (
    OnlineHadamard,
    describe_hadamard,
    fast_hadamard_transform,
    hadamard_factors,
    hadamard_matrix,
    inverse_fast_hadamard_transform,
    paley_matrix,
    random_orthogonal,
    random_rotation,
)


def sylvester(m: int) -> torch.Tensor:
    """Reference Sylvester matrix H_m = H_2 ⊗ ... ⊗ H_2."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # exact: integers in float64


def dense_reference(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[-1]
    p = 1 if base is None else base.shape[0]
    h = torch.kron(torch.ones(1, 1) if base is None else base, sylvester(n // p))
    return (x.double() @ h / n**0.5).to(x.dtype)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 44, 52, 60, 108, 140, 148, 344])
def test_hadamard_matrix_is_hadamard(n: int) -> None:
    assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize(
    ("q", "kind", "order"),
    [
        (9, "II", 20),
        (13, "II", 28),
        (25, "II", 52),
        (27, "I", 28),
        (49, "II", 100),
        (81, "II", 164),
        (121, "II", 244),
        (125, "II", 252),
        (243, "I", 244),
        (343, "I", 344),
    ],
)
def test_paley_over_prime_power_fields_is_hadamard(q: int, kind: str, order: int) -> None:
    h = paley_matrix(q, kind)
    assert h.shape[0] == order
    assert_hadamard(h)


def test_paley_i_is_not_symmetric_and_paley_ii_is() -> None:
    h1, h2 = paley_matrix(11, "I"), paley_matrix(9, "II")
    assert not torch.equal(h1, h1.T)
    assert torch.equal(h2, h2.T)


@pytest.mark.parametrize(("q", "kind"), [(15, "I"), (9, "I"), (11, "II"), (7, "III")])
def test_paley_rejects_wrong_q_or_kind(q: int, kind: str) -> None:
    with pytest.raises(ValueError, match="Paley"):
        paley_matrix(q, kind)


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (576, (36, 16)),
        (1536, (12, 128)),
        (3584, (28, 128)),
        (18944, (148, 128)),
        (2048, (1, 2048)),
        (4096, (1, 4096)),
        (5120, (20, 256)),
        (13824, (108, 128)),
        (8960, (140, 64)),
        (688, (344, 2)),
        (64, (1, 64)),
        (128, (1, 128)),
    ],
)
def test_factors_of_model_sizes_prefer_largest_power_of_two(n: int, factors: tuple[int, int]) -> None:
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [6, 9, 172, 92])
def test_no_factors_without_a_known_construction(n: int) -> None:
    assert hadamard_factors(n) is None
    assert hadamard_matrix(n) is None


@pytest.mark.parametrize("n", [576, 1536])
def test_full_product_is_hadamard_in_kron_order(n: int) -> None:
    p, power = hadamard_factors(n)
    h = hadamard_matrix(n)
    assert_hadamard(h)
    assert torch.equal(h, torch.kron(hadamard_matrix(p), sylvester(power)))


@pytest.mark.parametrize("n", [64, 160, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_transform_equals_dense_product(n: int, dtype: torch.dtype) -> None:
    p, _ = hadamard_factors(n)
    base = None if p == 1 else hadamard_matrix(p)
    x = torch.randn(5, n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    y = fast_hadamard_transform(x, base)
    assert y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, dense_reference(x, base), rtol=tol, atol=tol)


def test_fast_transform_over_last_dim_of_3d_input() -> None:
    base = hadamard_matrix(12)
    x = torch.randn(2, 3, 12 * 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        fast_hadamard_transform(x, base), dense_reference(x, base), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_transform_keeps_low_precision_dtype(dtype: torch.dtype) -> None:
    base = hadamard_matrix(36)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = fast_hadamard_transform(x, base)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), dense_reference(x.float(), base), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [128, 1536, 3584])
def test_inverse_undoes_transform(n: int) -> None:
    p, _ = hadamard_factors(n)
    base = None if p == 1 else hadamard_matrix(p)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(inverse_fast_hadamard_transform(fast_hadamard_transform(x, base), base), x)


def test_fast_transform_rejects_size_not_base_times_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        fast_hadamard_transform(torch.zeros(2, 12 * 3), hadamard_matrix(12))


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fast_transform_never_builds_an_n_by_n_matrix() -> None:
    n, base = 3584, hadamard_matrix(28)
    x = torch.randn(1, n)
    with LargestTensor() as mode:
        fast_hadamard_transform(x, base)
    assert 0 < mode.largest <= n  # a dense H_n would be n² = 12.8M elements


@pytest.mark.parametrize(
    ("n", "description"),
    [
        (576, "randomized Hadamard 36⊗16 (Paley II, q=17)"),
        (64, "randomized Hadamard 64 (Sylvester)"),
        (6, "randomized block-diagonal Hadamard, 3 blocks of 2 (no Hadamard matrix of order 6 known)"),
        (9, "random orthogonal (QR), no Hadamard of order 9"),
    ],
)
def test_random_orthogonal_is_orthogonal_and_named(n: int, description: str) -> None:
    r, text = random_orthogonal(n, seed=0)
    assert r.shape == (n, n) and r.dtype == torch.float64
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    assert text == description


def test_random_hadamard_is_signed_rows_of_hadamard() -> None:
    r, _ = random_orthogonal(576, seed=0)
    ratio = r * 576**0.5 / hadamard_matrix(576)  # each row is ±1 times a row of H
    signs = ratio[:, :1].round()
    assert set(signs.flatten().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(ratio, signs.expand_as(ratio))


@pytest.mark.parametrize("n", [576, 6, 9])
def test_random_orthogonal_is_deterministic_per_seed(n: int) -> None:
    assert torch.equal(random_orthogonal(n, seed=7)[0], random_orthogonal(n, seed=7)[0])
    assert not torch.equal(random_orthogonal(n, seed=7)[0], random_orthogonal(n, seed=8)[0])


@pytest.mark.parametrize(
    ("n", "kind", "base_order", "power"),
    [(1536, "hadamard", 12, 128), (2048, "hadamard", 1, 2048), (172, "block-diagonal", 1, 4)],
)
def test_online_hadamard_forward_equals_matrix(n: int, kind: str, base_order: int, power: int) -> None:
    module = OnlineHadamard(n)
    assert (module.order, module.kind, module.base_order, module.power) == (n, kind, base_order, power)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(4))
    y = module(x)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, (x.double() @ module.matrix()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1536, 172])
def test_online_hadamard_matrix_is_orthonormal(n: int) -> None:
    m = OnlineHadamard(n).matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_online_hadamard_keeps_bfloat16() -> None:
    module = OnlineHadamard(576)
    x = torch.randn(4, 576).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.double() @ module.matrix()).float(), rtol=1e-2, atol=1e-2)


def test_online_hadamard_base_is_a_non_persistent_buffer() -> None:
    module = OnlineHadamard(1536)
    assert dict(module.named_buffers())["base"].shape == (12, 12)
    assert module.state_dict() == {}
    assert "order=1536, kind=hadamard" in repr(module)


def test_online_hadamard_rejects_odd_order() -> None:
    with pytest.raises(PassError, match="odd order 9"):
        OnlineHadamard(9)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1536, "Hadamard 12⊗128 (Paley I, q=11)"),
        (18944, "Hadamard 148⊗128 (Paley II, q=73)"),
        (3584, "Hadamard 28⊗128 (Paley I, q=27)"),
        (4096, "Hadamard 4096 (Sylvester)"),
        (172, "block-diagonal Hadamard, 43 blocks of 4 (no Hadamard matrix of order 172 known)"),
    ],
)
def test_describe_names_construction(n: int, text: str) -> None:
    assert describe_hadamard(n) == text


# Orders of real widths and heads: Paley bases 12, 20, 28 (alone and ⊗ a power of two), powers of two split
# into several Sylvester factors, block-diagonal and QR fallbacks.
FACTORED_ORDERS = [12, 20, 28, 576, 1536, 2048, 3584, 6, 172, 9]


@pytest.mark.parametrize("n", FACTORED_ORDERS)
def test_factored_rotation_is_the_dense_one_to_float64_rounding(n: int) -> None:
    """The Kronecker factors multiply x by the matrix that the dense construction gives, to a bound of
    float64 rounding over n terms, applied and transposed (x·R and x·Rᵀ)."""
    rotation, description = random_rotation(n, seed=5)
    dense, dense_description = random_orthogonal(n, seed=5)
    assert description == dense_description
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bound = 4 * n * torch.finfo(torch.float64).eps * x.abs().max()
    assert (rotation.apply(x) - x @ dense).abs().max() <= bound
    assert (rotation.apply_transposed(x) - x @ dense.T).abs().max() <= bound
    assert (rotation.apply_transposed(rotation.apply(x)) - x).abs().max() <= bound


@pytest.mark.parametrize("n", [576, 1536, 3584, 172])
def test_online_hadamard_rotation_is_its_matrix_and_its_forward(n: int) -> None:
    module = OnlineHadamard(n)
    torch.testing.assert_close(module.rotation().matrix(), module.matrix(), rtol=0, atol=1e-15)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(module.rotation().apply(x.double()).float(), module(x), rtol=1e-5, atol=1e-5)


def test_factored_rotation_splits_a_power_of_two_into_small_factors() -> None:
    rotation, _ = random_rotation(18944, seed=0)
    assert [f.shape[0] for f in rotation.factors] == [148, 128]  # 276 multiply-adds per element, not 18944
    assert [f.shape[0] for f in random_rotation(4096, seed=0)[0].factors] == [64, 64]
