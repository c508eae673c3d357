"""Numerics: quantizers, GPTQ, Hadamard transforms, observers, lowered modules, block statistics, fidelity metrics."""
