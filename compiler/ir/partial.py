"""Repeated runs of a block graph that recompute only what some of its tensors reach.

A search tries several values of a few tensors (a norm's weight and the Linears reading it) on the same calls.
The graph nodes those tensors do not reach compute the same values on every trial: the first run keeps the ones
the recomputed nodes read, and later runs execute only the nodes downstream of the tensors, by the same calls
the graph's generated code makes, so their outputs are those of a whole run, bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg


class PartialRuns:
    """Runs of `graph_module` on fixed flat inputs, recomputing from the nodes that read `tensors` on.

    The first `run` executes every node and keeps the values its recomputed nodes read from the others
    (the frontier); every later `run` on the same calls executes only the recomputed nodes. The tensors' values
    and the hooks of the modules holding them may change between runs; nothing else in the graph may.
    """

    def __init__(self, graph_module: fx.GraphModule, reached: set[fx.Node]) -> None:
        self.graph_module = graph_module
        nodes = list(graph_module.graph.nodes)
        affected: set[fx.Node] = set()
        for node in nodes:
            if node in reached or node.op == "output" or any(arg in affected for arg in node.all_input_nodes):
                affected.add(node)
        self._all = nodes
        self._recomputed = [node for node in nodes if node in affected]
        self._frontier = {node for node in nodes if node not in affected and any(user in affected for user in node.users)}
        self._saved: list[dict[fx.Node, Any]] | None = None

    @classmethod
    def reading(cls, graph_module: fx.GraphModule, tensors: Iterable[torch.Tensor]) -> PartialRuns | None:
        """Runs recomputing from the nodes that read any of `tensors` (a module call reads its module's tensors, a
        get_attr the attribute's); None where some tensor is read by no node of the graph (nothing to go by)."""
        wanted = {id(tensor) for tensor in tensors}
        found: set[int] = set()
        reached: set[fx.Node] = set()
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                held = _tensors_of(graph_module.get_submodule(node.target))
            elif node.op == "get_attr":
                held = _tensors_of(_attribute(graph_module, node.target))
            else:
                continue
            hit = held & wanted
            if hit:
                reached.add(node)
                found |= hit
        return cls(graph_module, reached) if found == wanted else None

    def run(self, calls: Sequence[list[torch.Tensor]]) -> list[Any]:
        """The graph's outputs on each call's flat inputs (the same calls every time)."""
        if self._saved is None:
            self._saved = [{} for _ in calls]
            return [self._execute(self._all, dict(zip(self._placeholders(), flat)), saved)
                    for flat, saved in zip(calls, self._saved, strict=True)]
        if len(calls) != len(self._saved):
            raise ValueError(f"partial runs were set up on {len(self._saved)} calls, given {len(calls)}")
        return [self._execute(self._recomputed, dict(saved), None) for saved in self._saved]

    def _placeholders(self) -> list[fx.Node]:
        return [node for node in self._all if node.op == "placeholder"]

    def _execute(self, order: list[fx.Node], env: dict[fx.Node, Any], keep: dict[fx.Node, Any] | None) -> Any:
        """Execute `order`'s nodes with `env` holding the others' values they read; a value is dropped after its
        last reader, unless `keep` (the first run) takes it as a frontier value."""
        last_reader: dict[fx.Node, fx.Node] = {}
        for node in order:
            for arg in node.all_input_nodes:
                last_reader[arg] = node
        dead_after: dict[fx.Node, list[fx.Node]] = {}
        for value, reader in last_reader.items():
            dead_after.setdefault(reader, []).append(value)
        gm = self.graph_module
        for node in order:
            if node.op == "placeholder":
                result = env[node]
            else:
                args = map_arg(node.args, env.__getitem__)
                kwargs = map_arg(node.kwargs, env.__getitem__)
                if node.op == "output":
                    return args[0]
                if node.op == "call_module":
                    result = gm.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_function":
                    result = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:  # get_attr
                    result = _attribute(gm, node.target)
            env[node] = result
            if keep is not None and node in self._frontier:
                keep[node] = result
            for value in dead_after.get(node, ()):
                env.pop(value, None)
        raise ValueError("the graph has no output node")


def _attribute(module: torch.nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), module)


def _tensors_of(value: Any) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {id(value)}
    if isinstance(value, torch.nn.Module):
        return {id(t) for t in (*value.parameters(), *value.buffers())}
    return set()
