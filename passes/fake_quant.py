"""fake_quant: choose each layer's scheme by glob rules and put quantizers in the block graphs."""

from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from slimc.config import SlimcConfig
from slimc.config.steps import AssignedScheme
from slimc.errors import ConfigError, PassError
from slimc.ir import Block, Program, QuantSpec
from slimc.numerics.modules import FakeQuantExperts, FakeQuantize, KVCacheQuantize
from slimc.pass_base import Context, Pass, register_pass
from slimc.patterns import block_graph, find_experts, find_kv_inputs, find_linears
from slimc.plan import quantizable_layer_names
from slimc.schemes import KVCacheScheme


class Rule(BaseModel):
    """Layers whose qualified name matches an `include` glob and no `exclude` glob get `scheme`."""

    model_config = ConfigDict(extra="forbid")

    scheme: str
    include: list[str] = ["*"]
    exclude: list[str] = []
    optional: bool = False  # may select nothing: for configs shared by families with other layers

    def selects(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)


def glob_problem(pattern: str) -> str | None:
    """Why a glob cannot be what the user meant, or None."""
    if not pattern.strip():
        return "is empty"
    depth = 0
    for char in pattern:
        depth += char == "["
        depth -= char == "]"
        if depth < 0 or depth > 1:
            return "has unbalanced [ ]"
    return "has an unclosed [" if depth else None


@register_pass("fake_quant")
class FakeQuant(Pass):
    """Annotate layers with their scheme (later rule wins; unselected layers stay float) and insert
    an activation quantize-dequantize node before each selected Linear. Fused MoE experts get a
    module that quantizes each expert's inputs. Weights are quantized by `calibrate`.

    `kv_cache` (e.g. `{dtype: int8, granularity: per_channel, symmetric: true}`) also quantizes the keys (after
    RoPE) and values entering every attention kernel of the text decoder's blocks, static per channel, as a
    runtime with an int8 KV cache stores them (Ascend C8); `calibrate` fixes their scales."""

    rules: list[Rule] = Field(min_length=1)
    kv_cache: KVCacheScheme | None = None
    _rule_locations: dict[int, str] = PrivateAttr(default_factory=dict)

    def check(self, config: SlimcConfig, step_index: int) -> None:
        for i, rule in enumerate(self.rules):
            where = config.where("pipeline", step_index, "rules", i)
            self._rule_locations[i] = f"{where}: pipeline.{step_index}.rules.{i}"
            if rule.scheme not in config.schemes:
                known = ", ".join(sorted(config.schemes)) or "none defined under `schemes:`"
                raise ConfigError(f"{where}: pipeline.{step_index}.rules.{i}.scheme: unknown scheme {rule.scheme!r}; schemes: {known}")
            for key in ("include", "exclude"):
                for pattern in getattr(rule, key):
                    if problem := glob_problem(pattern):
                        raise ConfigError(f"{where}: pipeline.{step_index}.rules.{i}.{key}: glob {pattern!r} {problem}")

    def scheme_for(self, layer: str, config: SlimcConfig) -> AssignedScheme | None:
        chosen = None
        for rule in self.rules:
            if rule.selects(layer):
                chosen = rule.scheme
        return None if chosen is None else AssignedScheme(chosen, config.schemes[chosen])

    def prepare(self, program: Program, ctx: Context) -> None:
        """Every include glob of a rule that is not `optional` must select some layer: else it is a typo."""
        names = quantizable_layer_names(program)
        for i, rule in enumerate(self.rules):
            for pattern in [] if rule.optional else rule.include:
                if not any(fnmatchcase(name, pattern) for name in names):
                    example = ", ".join(names[:3])
                    where = self._rule_locations.get(i, f"fake_quant rule {i}")
                    raise ConfigError(f"{where}.include: glob {pattern!r} matches no quantizable layer; names look like {example}")

    def run_block(self, block: Block, ctx: Context) -> None:
        """Give the block's layers the schemes the plan gives them (resolved from the rules before any block ran)."""
        gm = block.graph_module
        experts = set(find_experts(gm))
        layers = set(find_linears(gm)) | experts
        for target in sorted(layers):
            planned = ctx.plan.scheme(block.qualified(target))
            if planned is None:
                continue
            scheme_name, scheme = planned
            ctx.program.quant_specs[block.qualified(target)] = QuantSpec(scheme_name, scheme)
            if target in experts:
                block.replace_leaf(target, FakeQuantExperts(block.leaf(target), scheme))
            elif scheme.act is not None:
                block.insert_input_quantizer(target, FakeQuantize(scheme.act))
        if self.kv_cache is not None and block.role == "text":
            self._quantize_kv_cache(block, self.kv_cache)

    @staticmethod
    def _quantize_kv_cache(block: Block, kv_cache: KVCacheScheme) -> None:
        """A KV cache quantizer on the key and value inputs of each attention kernel of the block (a decoder layer:
        its role is text, the only blocks runtimes keep a KV cache for)."""
        gm = block.graph_module
        found = find_kv_inputs(gm)
        kernels = block_graph(gm).of_kind("attention")
        if len(found) != len(kernels):
            missed = sorted({str(k.target) for k in kernels} - {str(f.kernel.target) for f in found})
            raise PassError(f"fake_quant: kv_cache: in {block.name}, the keys and values of {', '.join(missed)} are not "
                            "(batch, kv_heads, tokens, head_dim) tensors computed from one Linear each (a fused qkv "
                            "projection?); int8 KV cache scales are written under the k and v projections' names")
        for kv in found:
            for index, which, projection in ((1, "key", kv.k), (2, "value", kv.v)):
                quantizer = KVCacheQuantize(kv_cache, kv.heads, kv.head_dim, which, projection)
                block.insert_argument_node(kv.kernel, index, Block.kv_quantizer_target(kv.kernel.name, projection), quantizer)

