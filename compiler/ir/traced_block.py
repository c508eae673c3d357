"""A traced block: its fx graph, callable like the block for inputs that fit the traced specialisation.

The tracer (slimc.ir.tracer) records each Python-level decision it took on the example inputs as a
Guard; a TracedBlock checks new inputs against the input structure, constants, ranks, dtypes,
devices and those guards before running the graph, so it never silently computes something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from slimc.errors import TraceError

__all__ = ["Guard", "TracedBlock", "leaf_names", "normalise_inputs", "same_constant"]


@dataclass
class Guard:
    """A Python-level decision taken on the example inputs: `check(value of node) == expected`.

    `node` is in the guard graph (the part of the block graph that computes it); `where` is the
    model-code line that took the decision; `text` reads like `bool(gt(x.shape[1], 4)) == True`.
    """

    node: fx.Node
    check: Callable[[Any], Any]
    expected: Any
    where: str
    text: str = ""


def normalise_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(args), dict(sorted(kwargs.items()))


def leaf_names(paths: list[tuple], positional: list[str]) -> list[str]:
    """Readable names of input leaves: `hidden_states`, `position_embeddings[0]`, `arg3`."""
    names = []
    for top, first, *rest in paths:
        if top.idx == 0:
            head = positional[first.idx] if first.idx < len(positional) else f"arg{first.idx}"
        else:
            head = str(first.key)
        names.append(head + "".join(str(key) for key in rest))
    return names


def same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return a is b


def _has_path(module: nn.Module, target: str) -> bool:
    """Whether `target` names a submodule or a tensor attribute of `module`."""
    owner_path, _, attribute = target.rpartition(".")
    try:
        owner = module.get_submodule(owner_path)
    except AttributeError:
        return False
    return attribute in owner._modules or attribute in owner._parameters or attribute in owner._buffers


class TracedBlock(nn.Module):
    """A block's fx graph, callable like the block for inputs that fit the traced specialisation.

    `graph_module` shares the block's leaf modules (weight edits show in both) and takes the flat
    tensor inputs. `forward` flattens the block's `(args, kwargs)`, refuses inputs that differ from
    the traced ones in structure, constants, rank, dtype, device or a recorded guard, and runs it.
    """

    def __init__(self, graph_module: fx.GraphModule, guard_module: fx.GraphModule, guards: list[Guard], *,
                 name: str, block: nn.Module, spec: pytree.TreeSpec, names: list[str], positional: list[str],
                 leaves: list[Any], unread: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.name = name
        self.guards = guards
        self.__dict__["_guard_module"] = guard_module  # shares graph_module's leaves: not a submodule
        self.__dict__["_block"] = block
        self._spec, self._names, self._positional = spec, names, positional
        self._expected = [(leaf.dtype, leaf.ndim, leaf.device) if isinstance(leaf, torch.Tensor) else leaf
                          for leaf in leaves]
        self._is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        self._unread = unread  # constants the block never reads: any value of their type matches

    def __getattr__(self, name: str) -> Any:
        """Other attributes read through to the block, since model code reads some off its layers."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_block" not in self.__dict__:
                raise
            return getattr(self.__dict__["_block"], name)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the block (`attach` gives it back) and without the guards' nodes (only tracing needs them;
        the guard module, pickled as code, computes their values)."""
        state = dict(self.__dict__)
        state["_block"] = None
        state["guards"] = [dataclasses.replace(guard, node=None) for guard in self.guards]
        return state

    def attach(self, block: nn.Module) -> None:
        """After unpickling, run as `block` again and share its leaves: the block takes the graph's leaf modules
        and the tensors the graph reads (lowered layers included), so a weight read into one is read into both."""
        self.__dict__["_block"] = block
        gm = self.graph_module
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "get_attr") or not _has_path(block, node.target):
                continue
            owner_path, _, attribute = node.target.rpartition(".")
            owner, value = block.get_submodule(owner_path), gm.get_submodule(owner_path)
            if node.op == "call_module":
                owner.register_module(attribute, getattr(value, attribute))
            elif attribute in owner._parameters:
                owner.register_parameter(attribute, getattr(value, attribute))
            elif attribute in owner._buffers:
                owner.register_buffer(attribute, getattr(value, attribute), persistent=attribute not in owner._non_persistent_buffers_set)

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensor leaves of `(args, kwargs)` in graph placeholder order."""
        leaves = pytree.tree_leaves(normalise_inputs(args, kwargs))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def mismatch(self, args: tuple, kwargs: dict) -> str | None:
        """What makes these inputs differ from the traced specialisation, or None if they fit."""
        leaves, spec = pytree.tree_flatten(normalise_inputs(args, kwargs))
        if spec != self._spec:
            paths = [path for path, _ in pytree.tree_flatten_with_path(normalise_inputs(args, kwargs))[0]]
            got = leaf_names(paths, self._positional)
            missing, extra = [n for n in self._names if n not in got], [n for n in got if n not in self._names]
            return f"inputs {got} (missing {missing}, unexpected {extra}), traced with {self._names}"
        for index, (name, is_tensor, expected, leaf) in enumerate(zip(self._names, self._is_tensor, self._expected, leaves)):
            if is_tensor != isinstance(leaf, torch.Tensor):
                return f"input {name} is {type(leaf).__name__}, traced with {'a tensor' if is_tensor else repr(expected)}"
            if index in self._unread:
                if type(leaf) is not type(expected):
                    return f"input {name} is {type(leaf).__name__}, traced with {type(expected).__name__} (unread)"
                continue
            if is_tensor and (leaf.dtype, leaf.ndim, leaf.device) != expected:
                return (f"input {name} has dtype {leaf.dtype}, rank {leaf.ndim}, device {leaf.device}; "
                        f"traced with dtype {expected[0]}, rank {expected[1]}, device {expected[2]}")
            if not is_tensor and not same_constant(leaf, expected):
                return f"input {name} is {leaf!r}, traced with {expected!r}"
        if self.guards:
            flat = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            try:
                with torch.no_grad():
                    values = self.__dict__["_guard_module"](*flat)
            except Exception as exc:
                return f"guards could not be evaluated ({type(exc).__name__}: {exc})"
            for guard, value in zip(self.guards, values):
                got = guard.check(value)
                if got != guard.expected:
                    return f"guard {guard.text} fails (got {got!r}), recorded at {guard.where}"
        return None

    def matches(self, args: tuple, kwargs: dict) -> bool:
        """Whether the graph computes the block's function on these inputs."""
        return self.mismatch(args, kwargs) is None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        why = self.mismatch(args, kwargs)
        if why is not None:
            raise TraceError(f"block {self.name!r} was traced for other inputs: {why}; re-trace it for these")
        return self.graph_module(*self.flatten_inputs(args, kwargs))

    def run_flat(self, flat_inputs: list[torch.Tensor]) -> Any:
        """Run the graph on inputs already flattened by `flatten_inputs` (no checks)."""
        return self.graph_module(*flat_inputs)
