"""Block graph runs that execute only some of the graph: what some of its tensors reach, or what some values need.

A search tries several values of a few tensors (a norm's weight and the Linears reading it) on the same calls.
The graph nodes those tensors do not reach compute the same values on every trial: the first run keeps the ones
the recomputed nodes read, and later runs execute only the nodes downstream of the tensors, by the same calls
the graph's generated code makes, so their outputs are those of a whole run, bit for bit. A search that measures
one node's value runs only what that value needs; a statistics run that needs only the inputs of some leaves
stops there (`ObservedPrefix`).

Both rest on a value depending only on the nodes it reads, which in-place writes break: Wan's rotary embedding
fills a `torch.empty_like` tensor through `out[..., 0::2] = ...`, a node no value reads. So a statistics run
executes every node before its last observed value, and a graph holding an in-place write gets whole runs.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg


class PartialRuns:
    """Runs of `graph_module` on fixed flat inputs, recomputing from the nodes that read `tensors` on.

    The first `run` executes every node and keeps the values its recomputed nodes read from the others
    (the frontier); every later `run` on the same calls executes only the recomputed nodes. The tensors' values
    and the hooks of the modules holding them may change between runs; nothing else in the graph may.
    Runs `until` a node return its value and execute only what it needs.
    """

    def __init__(self, graph_module: fx.GraphModule, reached: set[fx.Node], until: fx.Node | None = None) -> None:
        self.graph_module, self.reached, self.until = graph_module, reached, until
        nodes = list(graph_module.graph.nodes)
        self._placeholders = [node for node in nodes if node.op == "placeholder"]
        if until is not None:
            needed = _needed_by(until)
            nodes = [node for node in nodes if node in needed]
        end = until if until is not None else nodes[-1]
        affected: set[fx.Node] = set()
        for node in nodes:
            if node in reached or node is end or any(arg in affected for arg in node.all_input_nodes):
                affected.add(node)
        self._all = nodes
        self._recomputed = [node for node in nodes if node in affected]
        self._frontier = {node for node in nodes if node not in affected and any(user in affected for user in node.users)}
        self._saved: list[dict[fx.Node, Any]] | None = None

    @classmethod
    def reading(cls, graph_module: fx.GraphModule, tensors: Iterable[torch.Tensor]) -> PartialRuns | None:
        """Runs recomputing from the nodes that read any of `tensors` (a module call reads its module's tensors, a
        get_attr the attribute's); None where some tensor is read by no node of the graph (nothing to go by)."""
        if any(mutates_in_place(node) for node in graph_module.graph.nodes):
            return None
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

    def ending_at(self, until: fx.Node) -> PartialRuns:
        """The same trials, run only as far as `until`, whose value they return."""
        return PartialRuns(self.graph_module, self.reached, until)

    def run(self, calls: Sequence[list[torch.Tensor]]) -> list[Any]:
        """The graph's outputs (or `until`'s value) on each call's flat inputs (the same calls every time)."""
        if self._saved is None:
            self._saved = [{} for _ in calls]
            return [self._execute(self._all, dict(zip(self._placeholders, flat)), saved)
                    for flat, saved in zip(calls, self._saved, strict=True)]
        if len(calls) != len(self._saved):
            raise ValueError(f"partial runs were set up on {len(self._saved)} calls, given {len(calls)}")
        return [self._execute(self._recomputed, dict(saved), None) for saved in self._saved]

    def _execute(self, order: list[fx.Node], env: dict[fx.Node, Any], keep: dict[fx.Node, Any] | None) -> Any:
        """Execute `order` with `env` holding the values it reads from other nodes; the first run (`keep`) keeps
        the frontier's values."""
        def kept(node: fx.Node, value: Any) -> None:
            if node in self._frontier:
                keep[node] = value

        if self.until is None:
            return execute(self.graph_module, order, env, kept if keep is not None else None)
        execute(self.graph_module, order, env, kept if keep is not None else None, retain=(self.until,))
        return env[self.until]


class ObservedPrefix:
    """Runs of a block graph that stop once the inputs or outputs of some of its leaves are computed: what
    statistics of those values need (channel maxima before the last Linear skip the Linear and what follows).
    A run executes every node before the last observed call, as a whole run does, so values filled in place are
    complete; the leaves it calls are seen by their module hooks, the input of the call it stops before goes to
    `run`'s `record`."""

    def __init__(self, graph_module: fx.GraphModule, calls: list[tuple[str, fx.Node, str]]) -> None:
        self.graph_module = graph_module
        nodes = list(graph_module.graph.nodes)
        self._order = nodes[:max(nodes.index(call) + (where == "output") for _, call, where in calls)]
        ran = set(self._order)
        self._recorded = [(target, call.args[0]) for target, call, _ in calls if call not in ran]

    @classmethod
    def of(cls, graph_module: fx.GraphModule, targets: dict[str, str]) -> ObservedPrefix | None:
        """`targets` maps a leaf to "input" (its first argument) or "output"; None where some leaf is not called by
        the graph, or is also called inside another leaf (module hooks see those calls, the graph's values not)."""
        calls: list[tuple[str, fx.Node, str]] = []
        modules = {node: graph_module.get_submodule(node.target) for node in graph_module.graph.nodes if node.op == "call_module"}
        for target, where in targets.items():
            leaf = graph_module.get_submodule(target)
            called = [node for node, module in modules.items() if module is leaf]
            inside = any(module is not leaf and any(sub is leaf for sub in module.modules()) for module in modules.values())
            if not called or inside or (where == "input" and not all(call.args and isinstance(call.args[0], fx.Node) for call in called)):
                return None
            calls.extend((target, call, where) for call in called)
        return cls(graph_module, calls)

    def run(self, flat_inputs: list[torch.Tensor], record: Callable[[str, torch.Tensor], None]) -> None:
        """Run the graph as far as the observed values; `record(leaf, x)` gets the input of the call it stops before."""
        placeholders = [node for node in self.graph_module.graph.nodes if node.op == "placeholder"]
        env = dict(zip(placeholders, flat_inputs))
        execute(self.graph_module, self._order, env, retain={value for _, value in self._recorded})
        for target, value in self._recorded:
            record(target, env[value])


def execute(graph_module: fx.GraphModule, order: list[fx.Node], env: dict[fx.Node, Any],
            visit: Callable[[fx.Node, Any], None] | None = None, retain: Collection[fx.Node] = ()) -> Any:
    """Execute `order`'s nodes (in graph order) by the calls the graph's generated code makes, with `env` holding
    the values they read from nodes outside it; `visit` sees each value. A value is dropped from `env` after its last
    reader, unless `retain` holds it.
    Returns the output node's value, None where `order` stops before it."""
    last_reader: dict[fx.Node, fx.Node] = {}
    for node in order:
        for arg in node.all_input_nodes:
            last_reader[arg] = node
    dead_after: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last_reader.items():
        dead_after.setdefault(reader, []).append(value)
    for node in order:
        if node.op == "placeholder":
            result = env[node]
        else:
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return args[0]
            if node.op == "call_module":
                result = graph_module.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                result = node.target(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # get_attr
                result = _attribute(graph_module, node.target)
        env[node] = result
        if visit is not None:
            visit(node, result)
        for value in dead_after.get(node, ()):
            if value not in retain:
                env.pop(value, None)
    return None


def _needed_by(node: fx.Node) -> set[fx.Node]:
    """`node` and every node whose value it reads, directly or not."""
    needed, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in needed:
            needed.add(current)
            stack.extend(current.all_input_nodes)
    return needed


def mutates_in_place(node: fx.Node) -> bool:
    """Whether the node writes into a tensor it reads (`x[i] = y`, `x.add_(y)`, `torch.relu_(x)`)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target is operator.setitem or (name.endswith("_") and not name.endswith("__"))
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


def _attribute(module: torch.nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), module)


def _tensors_of(value: Any) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {id(value)}
    if isinstance(value, torch.nn.Module):
        return {id(t) for t in (*value.parameters(), *value.buffers())}
    return set()
