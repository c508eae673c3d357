"""Hadamard rotations for QuaRot-style rotation of weights and activations: pure functions on tensors.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n·I, so H / √n is orthonormal. Model widths are
rarely powers of two (576 = 9·64, 18944 = 37·512), so H_n is built as a Kronecker product of a small dense
Paley base H_p and a Sylvester H_{2^j}; the fast transform applies the 2^j part as two Sylvester matrices of
about its square root each (H_{2^j} = H_a ⊗ H_b) and the base with a p×p matmul.

Kronecker convention: H_n = torch.kron(H_p, H_{2^j}), i.e. a length-n vector is read as a row-major
(p, 2^j) array, index i = a·2^j + b. Sylvester matrices are symmetric, Paley I bases are not, so the
inverse of a transform is its transpose (see `inverse_fast_hadamard_transform`).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn

from slimc.errors import PassError

_H2 = ((1.0, 1.0), (1.0, -1.0))
Poly = tuple[int, ...]  # coefficients over GF(p), lowest degree first


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_mul(a: Poly, b: Poly, p: int) -> Poly:
    prod = [0] * (len(a) + len(b) - 1)
    for (i, ai), (j, bj) in itertools.product(enumerate(a), enumerate(b)):
        prod[i + j] = (prod[i + j] + ai * bj) % p
    return tuple(prod)


def _poly_mod(a: Poly, modulus: Poly, p: int) -> Poly:
    """a mod a monic modulus of degree e, padded to e coefficients."""
    e = len(modulus) - 1
    rem = list(a) + [0] * max(0, e - len(a))
    for k in range(len(rem) - 1, e - 1, -1):  # cancel the top coefficient with a shifted modulus
        c = rem[k]
        for i, mi in enumerate(modulus):
            rem[k - e + i] = (rem[k - e + i] - c * mi) % p
    return tuple(rem[:e])


def _irreducible(p: int, e: int) -> Poly:
    """The first monic irreducible polynomial of degree e over GF(p): every other one is a product."""

    def monic(d: int) -> list[Poly]:
        return [(*low, 1) for low in itertools.product(range(p), repeat=d)]

    reducible = {_poly_mul(f, g, p) for d in range(1, e // 2 + 1) for f in monic(d) for g in monic(e - d)}
    return next(f for f in monic(e) if f not in reducible)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a − b) over GF(q), χ the quadratic character; (q, q) float64 in {0, ±1}.

    Element a < q is the polynomial whose coefficients are the base-p digits of a, modulo an irreducible
    polynomial of degree e, so that prime powers (9, 25, 27, 343, ...) work as well as primes.
    """
    p, e = _prime_power(q)
    digits = torch.arange(q)[:, None] // p ** torch.arange(e) % p  # (q, e)
    modulus = _irreducible(p, e)
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    for a in digits[1:].tolist():
        square = _poly_mod(_poly_mul(tuple(a), tuple(a), p), modulus, p)
        chi[sum(c * p**k for k, c in enumerate(square))] = 1.0
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # subtraction in GF(p^e) is digit-wise
    return chi[diff @ p ** torch.arange(e)]


def paley_matrix(q: int, kind: str) -> torch.Tensor:
    """Paley Hadamard matrix from a prime power q, float64 ±1.

    kind "I" (q ≡ 3 mod 4): order q + 1; kind "II" (q ≡ 1 mod 4): order 2(q + 1).
    """
    if kind not in ("I", "II") or _prime_power(q) is None or q % 4 != (3 if kind == "I" else 1):
        raise ValueError(f"Paley {kind} needs a prime power q ≡ {3 if kind == 'I' else 1} (mod 4), got q={q}")
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1.0
    core[1:, 0] = -1.0 if kind == "I" else 1.0
    core[1:, 1:] = _jacobsthal(q)
    eye = torch.eye(q + 1, dtype=torch.float64)
    if kind == "I":
        return core + eye  # core is skew with core coreᵀ = q·I
    # core is a symmetric conference matrix: 0 → [[1, -1], [-1, -1]], ±1 → ±H_2
    zero_block = torch.tensor(((1.0, -1.0), (-1.0, -1.0)), dtype=torch.float64)
    return torch.kron(core, torch.tensor(_H2, dtype=torch.float64)) + torch.kron(eye, zero_block)


@functools.cache
def _base_construction(p: int) -> tuple[str, int] | None:
    """("I" | "II", q) for the Paley matrix of order p, or None."""
    if p % 4:
        return None
    if _prime_power(p - 1) is not None:
        return "I", p - 1
    q = p // 2 - 1
    if q % 4 == 1 and _prime_power(q) is not None:
        return "II", q
    return None


@functools.cache
def _base_matrix(p: int) -> torch.Tensor:
    """Cached ±1 base of order p (a Paley construction, or [[1]] for p = 1); callers must not mutate it."""
    if p == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _base_construction(p)
    return paley_matrix(q, kind)


@functools.cache
def _sylvester(m: int) -> torch.Tensor:
    """Cached ±1 Sylvester matrix of order m (a power of two), float64; callers must not mutate it."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.kron(torch.tensor(_H2, dtype=torch.float64), h)
    return h


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(p, 2^j) with p·2^j = n and H_n = H_p ⊗ H_{2^j} constructible, largest 2^j first; None if none."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    j = (n & -n).bit_length() - 1
    for power in (1 << i for i in range(j, -1, -1)):
        p = n // power
        if p == 1 or _base_construction(p) is not None:
            return p, power
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n, (n, n) float64 with H Hᵀ = n·I, or None if no construction is known."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    p, power = factors
    return torch.kron(_base_matrix(p), _sylvester(power))


def _plan(n: int) -> tuple[int, int, int] | None:
    """(p, 2^j, blocks): I_blocks ⊗ H_p ⊗ H_{2^j}; a full Hadamard has blocks = 1. None for odd n with no H_n."""
    factors = hadamard_factors(n)
    if factors is not None:
        return (*factors, 1)
    power = n & -n  # largest power of two dividing n
    return None if power == 1 else (1, power, n // power)


def _factors(p: int, power: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal float64 Kronecker factors of a plan: (I_blocks ⊗ H_p / √p, H_{2^j} / √2^j)."""
    r_m = torch.kron(torch.eye(blocks, dtype=torch.float64), _base_matrix(p)) / math.sqrt(p)
    return r_m, _sylvester(power) / math.sqrt(power)


def _rotation(p: int, power: int, blocks: int) -> torch.Tensor:
    """The orthonormal (n, n) float64 matrix of a plan: I_blocks ⊗ H_p ⊗ H_{2^j} / √(p·2^j)."""
    return torch.kron(*_factors(p, power, blocks))


def fast_hadamard_transform(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """x @ H / √n over the last dim, H = torch.kron(base, H_{2^j}) with H_{2^j} Sylvester.

    x: (..., n); base: (p, p) ±1 Hadamard matrix, None for p = 1; n = p·2^j. Returns (..., n) in x.dtype,
    computed in float32 (float64 for float64 input). Never forms an n×n matrix.
    """
    n = x.shape[-1]
    p = 1 if base is None else base.shape[0]
    m = n // p
    if n % p or m & (m - 1):
        raise ValueError(f"last dim {n} is not {p} × a power of two")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dtype).reshape(-1, p, m)
    # H_{2^j} = H_a ⊗ H_b with a·b = 2^j, each about its square root: two small matmuls, n·(a + b) multiply-adds
    # per row; a butterfly's log2(m) passes over memory cost on CPU about as much as a Linear of the same width
    # (x @ kron(A, B) read as (a, b) is Aᵀ X B, and Sylvester matrices are symmetric)
    a = 1 << (m.bit_length() // 2)
    b = m // a
    y = (_sylvester(a).to(y) @ y.reshape(-1, p, a, b) @ _sylvester(b).to(y)).reshape(-1, p, m)
    if base is not None:
        y = base.to(y).T @ y  # (x @ kron(A, B)) read as (p, m) is Aᵀ X B
    return (y / math.sqrt(n)).reshape(x.shape).to(x.dtype)


def inverse_fast_hadamard_transform(y: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `fast_hadamard_transform(·, base)`: y @ Hᵀ / √n, which is the transform with baseᵀ."""
    return fast_hadamard_transform(y, None if base is None else base.T)


def describe_hadamard(n: int) -> str:
    """How an order-n rotation is built, for the run summary, e.g. "Hadamard 12⊗128 (Paley I, q=11)"."""
    plan = _plan(n)
    if plan is None:
        return f"no Hadamard rotation of odd order {n}"
    p, power, blocks = plan
    if blocks > 1:
        return f"block-diagonal Hadamard, {blocks} blocks of {power} (no Hadamard matrix of order {n} known)"
    if p == 1:
        return f"Hadamard {n} (Sylvester)"
    kind, q = _base_construction(p)
    sizes = f"{p}⊗{power}" if power > 1 else str(p)
    return f"Hadamard {sizes} (Paley {kind}, q={q})"


# Sylvester factors are split into pieces of at most this order: applying a Kronecker product costs
# n·Σ(factor orders) per row, against n² for the dense matrix (18944 = 148·128: 276 instead of 18944).
_MAX_FACTOR = 128


class KroneckerRotation:
    """R = diag(signs) · scale · (F_1 ⊗ F_2 ⊗ ... ⊗ F_r), float64, orthonormal, applied without forming R.

    x (..., n) is read as a row-major (..., d_1, ..., d_r) array and each factor multiplies its own axis, so
    x @ R costs n·Σd_i instead of n². Hadamard plans have ±1 (or 0 for block-diagonal bases) factors, whose
    products are exact in float64, and one 1/√n scale at the end: within float64 rounding of the dense
    `matrix()` (tests/test_hadamard.py bounds the difference). signs: (n,) ±1 or None.
    """

    def __init__(self, factors: tuple[torch.Tensor, ...], scale: float, signs: torch.Tensor | None = None) -> None:
        self.factors, self.scale, self.signs = factors, scale, signs
        self.order = math.prod(f.shape[0] for f in factors)

    @classmethod
    def hadamard(cls, p: int, power: int, blocks: int, signs: torch.Tensor | None = None) -> KroneckerRotation:
        """The rotation of a plan (p, 2^j, blocks) from `_plan`: diag(signs) · (I_blocks ⊗ H_p ⊗ H_{2^j}) / √n."""
        factors = []
        if blocks * p > 1:
            factors.append(torch.kron(torch.eye(blocks, dtype=torch.float64), _base_matrix(p)))
        bits = power.bit_length() - 1
        pieces = max(1, -(-bits // (_MAX_FACTOR.bit_length() - 1)))
        for k in range(pieces):  # H_{2^j} = H_{2^a} ⊗ H_{2^b} ⊗ ... since H_{2^j} = H_2^{⊗j}
            factors.append(_sylvester(1 << (bits * (k + 1) // pieces - bits * k // pieces)))
        return cls(tuple(factors), 1.0 / math.sqrt(p * power), signs)  # I_blocks needs no scale

    def matrix(self) -> torch.Tensor:
        """The dense (n, n) float64 matrix, for tests and small orders."""
        dense = functools.reduce(torch.kron, self.factors) * self.scale
        return dense if self.signs is None else self.signs[:, None] * dense

    def _kron(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        y = x.reshape(-1, *(f.shape[0] for f in self.factors))
        for axis, factor in enumerate(self.factors, start=1):
            factor = factor.to(y.device, y.dtype)
            y = torch.movedim(torch.movedim(y, axis, -1) @ (factor.T if transpose else factor), -1, axis)
        return y.reshape(x.shape) * self.scale

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R over the last dim, in x's dtype (callers pass float64 for exactness)."""
        if self.signs is not None:
            x = x * self.signs.to(x.device, x.dtype)
        return self._kron(x, transpose=False)

    def apply_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Rᵀ over the last dim."""
        y = self._kron(x, transpose=True)
        return y if self.signs is None else y * self.signs.to(y.device, y.dtype)


def precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (rotations are exact only up to the arithmetic), else float32."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def random_rotation(n: int, seed: int) -> tuple[KroneckerRotation, str]:
    """Offline rotation R for the residual stream, factored, and how it was built.

    diag(s) · H / √n with seeded random signs s when a Hadamard (or block-diagonal Hadamard) of order n is
    known, else Q of a seeded Gaussian's QR (one dense factor) with signs fixed so that Q is Haar-distributed.
    """
    gen = torch.Generator().manual_seed(seed)
    plan = _plan(n)
    if plan is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return KroneckerRotation((q * torch.sign(torch.diagonal(r)),), 1.0), f"random orthogonal (QR), no Hadamard of order {n}"
    signs = torch.randint(0, 2, (n, 1), generator=gen, dtype=torch.float64) * 2 - 1
    return KroneckerRotation.hadamard(*plan, signs=signs[:, 0]), f"randomized {describe_hadamard(n)}"


def random_orthogonal(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """`random_rotation` as a dense (n, n) float64 matrix with R Rᵀ = I (for rotating hidden states)."""
    rotation, description = random_rotation(n, seed)
    return rotation.matrix(), description


class OnlineHadamard(nn.Module):
    """Rotates the last dim of its input by an orthonormal Hadamard transform: forward(x) == x @ self.matrix().

    kind "hadamard": H_p ⊗ H_{2^j} / √n from `hadamard_factors(n)`; kind "block-diagonal" (no H_n known):
    I_m ⊗ H_{2^j} / √(2^j) over the largest power-of-two block. To keep a following Linear's output, give
    it the weight W @ self.matrix(). The base is a non-persistent buffer: `.to()` moves it, state_dict
    does not hold it.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        plan = _plan(n)
        if plan is None:
            raise PassError(f"no Hadamard rotation of odd order {n}; leave this layer out of the rotation")
        self.order = n
        self.base_order, self.power, self.blocks = plan
        self.kind = "hadamard" if self.blocks == 1 else "block-diagonal"
        base = None if self.base_order == 1 else _base_matrix(self.base_order).clone()
        self.register_buffer("base", base, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) -> (..., n), in x.dtype."""
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.base_order * self.power)
        return fast_hadamard_transform(blocks, self.base).reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """The (n, n) float64 orthonormal matrix that forward multiplies by, on the CPU."""
        return _rotation(self.base_order, self.power, self.blocks)

    def rotation(self) -> KroneckerRotation:
        """What forward multiplies by, factored (for fusing into weights without an n×n matmul)."""
        return KroneckerRotation.hadamard(self.base_order, self.power, self.blocks)

    def kronecker_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_m, R_n) float64, orthonormal, with matrix() == kron(R_m, R_n): R_m (m, m) spans the blocks and
        the dense base, R_n (2^j, 2^j) the Sylvester part. Runtimes apply it as R_mᵀ · X · R_n on x read as (m, n)."""
        return _factors(self.base_order, self.power, self.blocks)

    def extra_repr(self) -> str:
        return f"order={self.order}, kind={self.kind}, base_order={self.base_order}, power={self.power}"
