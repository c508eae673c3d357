"""Whether `torch._int_mm` sums int8 products exactly on a device: where it does, lowered layers and the Ascend
reader multiply integer codes; elsewhere they multiply dequantized values in float32."""

from __future__ import annotations

import functools

import torch


def integer_matmul_available(device: torch.device) -> bool:
    """On the CPU, if `exact_on_this_cpu`; other devices take the float path (their int8 kernels have shape rules
    of their own, and their float32 matmuls are not what a compile waits on)."""
    return device.type == "cpu" and exact_on_this_cpu()


@functools.cache
def exact_on_this_cpu() -> bool:
    """Probed once, against int64 sums, on codes that include the extremes: x86 CPUs without VNNI multiply int8 as
    uint8 × int8 pairs summed in 16 bits, which saturate at (127 + 128) · 127 · 2; a build without an int8 CPU
    kernel raises."""
    codes = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    codes[0], codes[1] = 127, -128
    codes[2, ::2], codes[2, 1::2] = 127, -128
    weight = codes[:24].clone()
    try:
        products = torch._int_mm(codes, weight.t())
    except RuntimeError:
        return False
    return torch.equal(products.long(), codes.long() @ weight.long().t())
