"""Trace one block (decoder layer, vision block, DiT block) into an fx graph, using example inputs.

A plain `fx.Tracer` fails on real blocks: they unpack `x.shape`, iterate `chunk()` results and
branch on `ndim`. Here every proxy also carries the value its node had on the example inputs, so
such Python-level decisions use the real value. Each decision is recorded as a guard; a TracedBlock
refuses inputs for which a guard (or the input structure, ranks and dtypes) would decide otherwise.
Shapes that only flow into tensor ops stay symbolic (`size`/`getitem` nodes), so one trace serves
every sequence length. The graph keeps Linears, norms, MoE experts and the attention kernel as
`call_module` leaves under the block's own dotted names, which is what the passes match on.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from slimc.errors import TraceError
from slimc.ir.leaves import leaf_kind, register_leaf
from slimc.ir.traced_block import Guard, TracedBlock, leaf_names, normalise_inputs, same_constant

KERNEL_NAME = "attention_kernel"
_KERNEL_GLOBALS = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
# Fixed for a given input rank/dtype/device (all checked by `matches`), so folded to constants.
_FOLDED_ATTRS = frozenset({"dtype", "device", "ndim", "dim", "is_floating_point", "is_cuda"})
_INTERNAL_FILES = (os.path.join("torch", "fx", ""), os.path.join("torch", "nn", "modules", "module.py"),
                   os.path.join("torch", "utils", "_pytree.py"), os.path.join("torch", "overrides.py"),
                   os.path.join("torch", "_tensor.py"), os.path.abspath(__file__))


def is_leaf_module(module: nn.Module) -> bool:
    """Whether the tracer keeps `module` as one `call_module` node instead of tracing into it.

    Leaves are what passes act on (Linear/Conv/Embedding weights, norms to fold scales into, fused
    MoE experts, attention) plus rotary modules and slimc's own modules: the table is `slimc.ir.leaves`.
    """
    return leaf_kind(module) is not None


@register_leaf("attention")
class AttentionKernel(nn.Module):
    """The attention kernel of one transformers attention module, as a leaf.

    transformers picks the kernel by a dictionary lookup inside `*Attention.forward`, which fx cannot
    wrap; while tracing, that lookup returns this module instead, so attention is one graph node.
    The kernel is looked up again on every call from the owner's config, so the graph follows the
    model's `attn_implementation` (sdpa, eager, ...) outside the tracer as well.
    """

    def __init__(self, owner: nn.Module, interface: Any, eager: Callable | None) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner  # the parent module: kept out of the module tree
        self.__dict__["_interface"] = interface
        self.__dict__["_eager"] = eager
        self.implementation: str | None = None  # set when the model asked for a kernel by name

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        owner, interface, eager = self._owner, self._interface, self._eager
        name = self.implementation or getattr(getattr(owner, "config", None), "_attn_implementation", None)
        if interface is not None and name not in (None, "eager"):
            kernel = interface.get_interface(name, eager)
        elif eager is not None:
            kernel = eager
        else:
            raise TraceError(f"{type(owner).__name__}: no attention kernel for implementation {name!r}")
        return kernel(owner, query, key, value, *args, **kwargs)


def _route_to_kernel(module: nn.Module, query: Any, key: Any, value: Any, *args: Any,
                     _kernel_name: str | None = None, **kwargs: Any) -> Any:
    kernel = module._modules.get(KERNEL_NAME)
    if not isinstance(kernel, AttentionKernel):
        raise TraceError(f"{type(module).__name__} calls an attention kernel but has no {KERNEL_NAME}")
    kernel.implementation = _kernel_name
    return kernel(query, key, value, *args, **kwargs)


class _AttentionRouter:
    """Stands in for ALL_ATTENTION_FUNCTIONS while tracing: every lookup answers the routing function."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def get_interface(self, name: str, default: Callable | None = None) -> Callable:
        return _route_to_kernel

    get = get_interface

    def __getitem__(self, name: str) -> Callable:
        return lambda *args, **kwargs: _route_to_kernel(*args, _kernel_name=name, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _routed_attention(block: nn.Module) -> Iterator[None]:
    """Attach an AttentionKernel to each attention module of `block`; route kernel lookups to it meanwhile."""
    patched: dict[int, tuple[dict, dict]] = {}
    for module in list(block.modules()):
        forward = inspect.unwrap(type(module).forward)
        names = set(getattr(getattr(forward, "__code__", None), "co_names", ()))
        if not names & set(_KERNEL_GLOBALS):
            continue
        module_globals = forward.__globals__
        if KERNEL_NAME not in module._modules:
            interface = module_globals.get("ALL_ATTENTION_FUNCTIONS")
            interface = interface._real if isinstance(interface, _AttentionRouter) else interface
            eager = module_globals.get("eager_attention_forward")
            eager = None if eager is _route_to_kernel else eager
            module.add_module(KERNEL_NAME, AttentionKernel(module, interface, eager))
        saved = {name: module_globals[name] for name in _KERNEL_GLOBALS if name in module_globals}
        patched.setdefault(id(module_globals), (module_globals, saved))
    try:
        for module_globals, saved in patched.values():
            if "ALL_ATTENTION_FUNCTIONS" in saved:
                module_globals["ALL_ATTENTION_FUNCTIONS"] = _AttentionRouter(saved["ALL_ATTENTION_FUNCTIONS"])
            if "eager_attention_forward" in saved:
                module_globals["eager_attention_forward"] = _route_to_kernel
        yield
    finally:
        for module_globals, saved in patched.values():
            module_globals.update(saved)


def _autowrap_functions() -> tuple[Callable, ...]:
    """diffusers' attention dispatcher, when diffusers is in use, becomes one call_function node."""
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    fn = getattr(dispatch, "dispatch_attention_fn", None)
    return (fn,) if fn is not None else ()


class _ValueProxy(fx.Proxy):
    """A Proxy that also carries the value of its node on the example inputs."""

    value: Any

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("value", "node", "_node", "root", "attr", "tracer"):
            raise AttributeError(name)
        value = getattr(self.value, name)
        if name in _FOLDED_ATTRS:
            return value
        attribute = _ValueAttribute(self, name)
        attribute.value = value
        return attribute

    def __bool__(self) -> bool:
        return self.tracer.specialise(self, bool)

    def __len__(self) -> int:
        return self.tracer.specialise(self, len)

    def __int__(self) -> int:
        return self.tracer.specialise(self, int)

    def __index__(self) -> int:
        return self.tracer.specialise(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.specialise(self, float)

    def __iter__(self) -> Iterator[_ValueProxy]:
        return iter([self[i] for i in range(len(self))])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ValueAttribute(_ValueProxy, fx.proxy.Attribute):
    """`x.shape`, `x.view`, ...: a value proxy whose getattr node is created only if it is used."""


def _user_location(frames: list[traceback.FrameSummary]) -> str:
    """The model-code line among `frames` (outermost first) that issued the operation."""
    found = None
    for frame in frames:
        if frame.name == "_evaluate" and found is not None:
            break
        if not any(part in frame.filename for part in _INTERNAL_FILES):
            found = frame
    if found is None:
        return "<unknown location>"
    return f"{os.path.basename(found.filename)}:{found.lineno} `{(found.line or '').strip()}`"


class _ValueTracer(fx.Tracer):
    """fx.Tracer whose proxies carry values: each node runs on the example values as it is created."""

    def __init__(self, names: list[str], values: list[torch.Tensor], call: Callable[[list], Any]) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self._names, self._values, self._call = names, values, call
        self._depth = 0  # > 0 while an op runs on real values: module calls and attributes are then real
        self.guards: list[Guard] = []
        self.non_tensor: set[fx.Node] = set()
        self.failing_op: str | None = None
        self._root_parameter_ids: set[int] | None = None
        self._foreign_parameters: dict[int, torch.Tensor] = {}

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        proxies = []
        for name, value in zip(self._names, self._values):
            proxy = self.create_proxy("placeholder", name, (), {})
            proxy.value = value
            proxies.append(proxy)
        return (lambda: self._call(root_fn, self.root, proxies)), []

    def proxy(self, node: fx.Node) -> _ValueProxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Callable | None = None) -> _ValueProxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        if kind != "placeholder":
            proxy.value = self._evaluate(kind, target, args, kwargs)
            if not isinstance(proxy.value, torch.Tensor):
                self.non_tensor.add(proxy.node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        args, kwargs = map_aggregate((args, kwargs), lambda a: a.value if isinstance(a, _ValueProxy) else a)
        self._depth += 1
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
            return operator.attrgetter(target)(self.root)
        except Exception:
            self.failing_op = f"{kind} {getattr(target, '__name__', target)}"
            raise
        finally:
            self._depth -= 1

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._depth or not self._installed(m):
            # A module the block calls but does not own (transformers' kernel-hub function wrappers,
            # helpers shared between blocks) is not something a pass can address by name: it is traced
            # through like any function, its own parameters becoming constants (see create_arg).
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _installed(self, module: nn.Module) -> bool:
        try:
            self.path_of_module(module)
        except NameError:
            return False
        return True

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, nn.Parameter) and id(a) not in self._root_parameters():
            a = self._foreign_parameters.setdefault(id(a), a.detach())
        return super().create_arg(a)

    def _root_parameters(self) -> set[int]:
        if self._root_parameter_ids is None:
            self._root_parameter_ids = {id(p) for p in self.root.parameters()}
        return self._root_parameter_ids

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._depth:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m)

    def specialise(self, proxy: _ValueProxy, check: Callable[[Any], Any]) -> Any:
        """Decide with the example value, and record the decision as a guard.

        Not recorded, as other checks cover them: the length of a shape (ranks are checked per
        input) and the length of a module's or a structseq's output (their structure is fixed).
        """
        result = check(proxy.value)
        fixed = isinstance(proxy.value, torch.Size) or hasattr(type(proxy.value), "n_fields")
        if check is len and (fixed or proxy.node.op == "call_module"):
            return result
        node = proxy.node
        if not any(g.node is node and g.check is check for g in self.guards):
            self.guards.append(Guard(node, check, result, _user_location(traceback.extract_stack())))
        return result


def _describe(arg: Any, depth: int = 4) -> str:
    """A short Python-like expression for a node, to name guards in messages."""
    if isinstance(arg, slice):
        parts = ["" if p is None else _describe(p, depth) for p in (arg.start, arg.stop, arg.step)]
        return ":".join(parts[:2] if arg.step is None else parts)
    if not isinstance(arg, fx.Node):
        return repr(arg)
    if arg.op in ("placeholder", "get_attr") or depth == 0:
        return arg.name if depth else "..."
    args = [_describe(a, depth - 1) for a in arg.args]
    if arg.target is getattr:
        return f"{args[0]}.{arg.args[1]}"
    if arg.target is operator.getitem:
        return f"{args[0]}[{_describe(arg.args[1], depth - 1)}]"
    if arg.op == "call_method":
        return f"{args[0]}.{arg.target}({', '.join(args[1:])})"
    return f"{getattr(arg.target, '__name__', arg.target)}({', '.join(args)})"


def _guard_graph(graph: fx.Graph, guards: list[Guard]) -> fx.Graph:
    """A copy of `graph` reduced to what computes the guarded values (usually a few shape ops)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copy.graph_copy(graph, env)
    copy.output(tuple(env[guard.node] for guard in guards))
    for node in reversed(list(copy.nodes)):
        if node.op not in ("placeholder", "output") and not node.users:
            copy.erase_node(node)
    for guard in guards:
        guard.node = env[guard.node]
    return copy


def _drop_unused(graph: fx.Graph, non_tensor: set[fx.Node]) -> None:
    """Remove shape arithmetic and tuple unpacking left without users, so the graph reads as the model."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method", "get_attr") or node.is_impure():
            continue
        if node.op == "get_attr" or node in non_tensor or node.target is operator.getitem:
            graph.erase_node(node)


def _difference(expected: Any, actual: Any) -> str | None:
    """Why `actual` is not exactly `expected` (NaNs at the same places count as equal), or None."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    if exp_spec != act_spec:
        return f"output structure {act_spec} instead of {exp_spec}"
    for i, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        if not isinstance(e, torch.Tensor):
            if not same_constant(e, a):
                return f"output leaf {i} is {a!r} instead of {e!r}"
        elif not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            return f"output leaf {i} is {getattr(a, 'shape', a)} instead of a {e.dtype} tensor of shape {e.shape}"
        elif not torch.equal(a, e) and not torch.equal(a.nan_to_num(0.0), e.nan_to_num(0.0)):
            diff = (a.double() - e.double()).abs().nan_to_num(float("inf")).max().item()
            return f"output leaf {i} differs by max abs {diff:.3g}"
    return None


class _Unread:
    """Stands in for a non-tensor extra argument while checking that a block ignores it."""

    def __repr__(self) -> str:
        return "<unread>"


def _extra_constants(parameters: list[inspect.Parameter], with_paths: list[tuple]) -> list[int]:
    """Indices of non-tensor leaves that land in the block's `*args` / `**kwargs` rather than a named parameter."""
    named = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    extras = []
    for index, (path, leaf) in enumerate(with_paths):
        if isinstance(leaf, torch.Tensor):
            continue
        top, first = path[0], path[1]
        if (top.idx == 0 and var_positional and first.idx >= len(positional)) or \
                (top.idx == 1 and var_keyword and first.key not in named):
            extras.append(index)
    return extras


def _unread_constants(block: nn.Module, leaves: list[Any], spec: pytree.TreeSpec, extras: list[int],
                      expected: Any) -> frozenset[int]:
    """The extra constants the block never reads: it computes exactly the same with placeholders in their
    place (HunyuanVideo blocks swallow an unused int in `*args`). They are then not baked into the trace,
    so inputs that differ only there still match; else (the block reads one) every extra stays a constant."""
    if not extras:
        return frozenset()
    probe = list(leaves)
    for index in extras:
        probe[index] = _Unread()
    call_args, call_kwargs = pytree.tree_unflatten(probe, spec)
    try:
        with torch.no_grad():
            output = block.forward(*call_args, **call_kwargs)
    except Exception:
        return frozenset()
    return frozenset(extras) if _difference(expected, output) is None else frozenset()


def trace_block(block: nn.Module, args: tuple, kwargs: dict, *, name: str) -> TracedBlock:
    """Trace one block (decoder layer, vision block, DiT block) on example inputs.

    `(args, kwargs)` are the block's inputs as the model called it (capture them with a forward
    pre-hook, `with_kwargs=True`). Tensor leaves become graph inputs; other leaves are baked in,
    except those passed into the block's `*args`/`**kwargs` that it never reads (any value of
    the same type then matches).
    The graph is checked to reproduce `block.forward` exactly on these inputs; a block that cannot
    be traced, or whose graph differs, raises TraceError naming the block and the operation.
    """
    args, kwargs = normalise_inputs(args, kwargs)
    with_paths, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in with_paths]
    parameters = list(inspect.signature(block.forward).parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = leaf_names([path for path, _ in with_paths], positional)
    tensor_names = [n for n, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def call(forward: Callable, root: nn.Module, proxies: list[_ValueProxy]) -> Any:
        substitutes = iter(proxies)
        filled = [next(substitutes) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        return forward(root, *call_args, **call_kwargs)

    placeholder_names = [re.sub(r"\W+", "_", n).strip("_") or "input" for n in tensor_names]
    tracer = _ValueTracer(placeholder_names, [t.clone() for t in tensors], call)
    try:
        with torch.no_grad():
            expected = block.forward(*args, **kwargs)
    except Exception as exc:
        raise TraceError(f"block {name!r} fails on its example inputs: {type(exc).__name__}: {exc}") from exc
    unread = _unread_constants(block, leaves, spec, _extra_constants(parameters, with_paths), expected)
    attributes_before = set(block.__dict__)
    try:
        with torch.no_grad(), _routed_attention(block):
            graph = tracer.trace(block)
    except Exception as exc:
        where = _user_location(traceback.extract_tb(exc.__traceback__))
        op = f"{tracer.failing_op} " if tracer.failing_op else ""
        raise TraceError(f"cannot trace block {name!r}: {op}at {where} failed: {type(exc).__name__}: {exc}") from exc
    try:
        for guard in tracer.guards:
            guard.text = f"{guard.check.__name__}({_describe(guard.node)}) == {guard.expected!r}"
        guard_graph = _guard_graph(graph, tracer.guards)
        _drop_unused(graph, tracer.non_tensor)
        graph.lint()
        graph._tracer_cls = guard_graph._tracer_cls = None  # unpickling (resume) re-traces the code with fx's own tracer
        graph_module = fx.GraphModule(block, graph, class_name=f"{type(block).__name__}Graph")
        guard_module = fx.GraphModule(block, guard_graph, class_name=f"{type(block).__name__}Guards")
    finally:
        for key in set(block.__dict__) - attributes_before:  # constants fx parked on the block
            del block.__dict__[key]
    traced = TracedBlock(graph_module, guard_module, tracer.guards, name=name, block=block, spec=spec,
                         names=names, positional=positional, leaves=leaves, unread=unread)
    with torch.no_grad():
        difference = _difference(expected, traced.run_flat([t.clone() for t in tensors]))
    if difference is not None:
        hint = " (the block is in training mode: call .eval() first)" if block.training else ""
        raise TraceError(f"block {name!r}: the traced graph differs from the block on the example inputs: "
                         f"{difference}{hint}")
    return traced
