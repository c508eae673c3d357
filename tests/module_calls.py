"""What modules are called with during a run: the one recorder behind every test that needs a block's (or a
layer's) inputs or outputs as the model passes them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimc.ir.hooks import temporary_hooks

Call = tuple[str, tuple, dict, object]  # (name, args, kwargs, output)


def module_calls(modules: Iterable[tuple[str, nn.Module]], run: Callable[[], object]) -> list[Call]:
    """`(name, args, kwargs, output)` of every call of the named `modules` while `run()` runs without gradients,
    in the order the calls finish."""
    calls: list[Call] = []
    pending: dict[str, tuple[tuple, dict]] = {}
    with temporary_hooks() as hooks:
        for name, module in modules:
            hooks.before(module, lambda m, args, kwargs, n=name: pending.__setitem__(n, (args, dict(kwargs))),
                         with_kwargs=True)
            hooks.after(module, lambda m, args, kwargs, output, n=name: calls.append((n, *pending.pop(n), output)),
                        with_kwargs=True)
        with torch.no_grad():
            run()
    return calls
