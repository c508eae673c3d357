"""Forward hooks that live exactly as long as a `with` block.

    with temporary_hooks() as hooks:
        hooks.before(layer, lambda m, args: seen.append(args[0]))
        model(batch)

Every hook registered through `hooks` is removed when the block exits, on an error too (even one
raised while later hooks were still being registered), so no hook outlives the run it observes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Registers forward hooks and keeps their handles for `temporary_hooks` to remove."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def before(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        """A forward pre-hook: `hook(module, args)`, or `hook(module, args, kwargs)` with `with_kwargs`."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def after(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        """A forward hook: `hook(module, args, output)`, or `hook(module, args, kwargs, output)` with `with_kwargs`."""
        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def temporary_hooks() -> Iterator[Hooks]:
    """A `Hooks` whose hooks are all removed when the context exits."""
    hooks = Hooks()
    try:
        yield hooks
    finally:
        hooks._remove()
