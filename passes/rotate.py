"""rotate: QuaRot-style orthogonal rotations that leave the float model's function unchanged but
spread activation outliers over all channels, so 4-bit activations and weights lose far less.

- R1, offline: the residual stream (hidden states between blocks) becomes x·R1, R1 a seeded
  randomised Hadamard, or one learned from it (`learn`, slimc.passes.learned_rotation). Every layer reading the stream (through a scale-free RMS norm) takes W·R1,
  every layer writing it R1ᵀ·W; the embeddings E·R1 and the head (W_head∘g)·R1 outside the blocks.
- R2, offline: per attention head between v_proj and o_proj, a seeded Hadamard, or one learned per layer with R1.
- online: a Hadamard node before each down projection (MLP and MoE experts), computed at run
  time by a fast Walsh–Hadamard transform, its transpose fused into the down weights.
- online_qk: a Hadamard per head on the queries and keys after RoPE (nothing to fuse: q·kᵀ is unchanged), so
  that an int8 KV cache (fake_quant's kv_cache) stores keys whose outlier channels are spread over the head.
The equivalence check confirms every block computes what it did, in the rotated basis.
"""

from __future__ import annotations

import torch
from pydantic import PrivateAttr
from torch import nn

from slimc.errors import PassError
from slimc.ir import Block, Program
from slimc.numerics import folding
from slimc.numerics.hadamard import KroneckerRotation, OnlineHadamard, describe_hadamard, random_rotation
from slimc.numerics.modules import FakeQuantExperts, QKHadamard
from slimc.pass_base import Context, Pass, register_pass
from slimc.passes.learned_rotation import RotationLearner, RotationLearning, stream_layers
from slimc.patterns import find_experts, find_kv_inputs
from slimc.patterns.fold import norm_has_affine_weight, update_in_parts


@torch.no_grad()
def rotate_inputs(weight: torch.Tensor, rotation: folding.Rotation) -> None:
    """In place, computed in float64 where the device has it: W (..., in) -> W·(I ⊗ R), the layer now reads x·(I ⊗ R)
    and computes what it did on x (numerics.folding.rotated_inputs)."""
    update_in_parts(weight, lambda part: folding.rotated_inputs(folding.precise(part), rotation).to(part.dtype))


@torch.no_grad()
def rotate_outputs(weight: torch.Tensor, bias: torch.Tensor | None, rotation: folding.Rotation) -> None:
    """In place, likewise: W (..., out, in) -> (I ⊗ R)ᵀ·W and b -> b·(I ⊗ R), the layer now writes y·(I ⊗ R)."""
    update_in_parts(weight, lambda part: folding.rotated_outputs(folding.precise(part), None, rotation)[0].to(part.dtype), trailing=2)
    if bias is not None:
        bias.copy_(folding.rotated_inputs(folding.precise(bias), rotation).to(bias.dtype))


def check_rotatable_norm(norm: nn.Module, name: str, rotation: torch.Tensor) -> None:
    """A norm commutes with a rotation only if it is scale-free and RMS-like: norm(x R) == norm(x) R."""
    if norm_has_affine_weight(norm) and not bool((norm.weight == 1).all()):
        raise PassError(f"rotate: norm {name} still has a scale; put `- pass: norm_fusion` before rotate (and smooth after it)")
    param = next(iter(norm.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(4, rotation.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    r = rotation.to(device, torch.float32)
    with torch.no_grad():
        error = (norm(x @ r).float() - norm(x).float() @ r).abs().max().item()
    if error > 1e-3:
        raise PassError(f"rotate: norm {name} ({type(norm).__name__}) does not commute with a rotation (difference {error:.2e}); "
                        "only RMS-style norms do. Remove the rotate pass for this model")


@register_pass("rotate")
class Rotate(Pass):
    """QuaRot rotation: R1 on the residual stream (seeded by `seed`), R2 per attention head when
    `heads`, an online Hadamard before every down projection when `online_down`, and one on each text block's
    attention queries and keys after RoPE when `online_qk` (for fake_quant's kv_cache, whose key scales are then
    calibrated on the rotated keys). With `learn`, R1 (and each layer's R2, unless `learn.heads` is false) is
    learned from the Hadamard for the quantized model (SpinQuant) before it is folded. Needs `norm_fusion` before it; passes that gather statistics (smooth,
    fake_quant, calibrate) come after."""

    requires = ("norm_fusion",)
    runs_before = ("smooth", "fake_quant", "calibrate", "lower")
    runs_before_reason = "they measure activations that the rotation changes"
    preserves_function = True

    seed: int = 0
    heads: bool = True
    online_down: bool = True
    online_qk: bool = False
    learn: RotationLearning | None = None
    _rotation: torch.Tensor | None = PrivateAttr(None)  # dense, for the calibration inputs and the equivalence check
    _factored: folding.Rotation | None = PrivateAttr(None)  # the same R, for the weights (factored unless learned)
    _head_rotations: dict[int, KroneckerRotation] = PrivateAttr(default_factory=dict)
    _learned_heads: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)  # qualified v_proj -> its layer's R2

    def stream_rotation(self) -> torch.Tensor | None:
        return self._rotation

    def learned_head_rotations(self) -> dict[str, torch.Tensor]:
        """Each learned R2 (float64), by the qualified name of the v projection it follows; empty unless learned."""
        return dict(self._learned_heads)

    def prepare(self, program: Program, ctx: Context) -> None:
        if self.online_qk and not any(getattr(step, "kv_cache", None) is not None for step in ctx.steps):
            raise PassError("rotate: online_qk rotates the attention's queries and keys for a quantized KV cache, but no "
                            "fake_quant step has kv_cache; add kv_cache: {dtype: int8, granularity: per_channel} to "
                            "fake_quant, or remove online_qk")
        if not program.embeddings or program.head is None or len(program.stages) != 1:
            raise PassError(f"rotate: the {program.family} frontend does not give one residual stream from embeddings to "
                            "a head, so the stream cannot be rotated; remove the rotate pass")
        model = program.model
        hidden = model.get_submodule(program.embeddings[0]).weight.shape[-1]
        self._factored, description = random_rotation(hidden, self.seed)
        self._rotation = self._factored.matrix()
        ctx.report.note(f"rotate: residual stream ({hidden}) rotated by a {description}, seed {self.seed}")
        if self.learn is not None:
            description = self._learn(program, ctx, description)
        self._untie_head(program, ctx)
        self._rotate_head(program)
        for name in program.embeddings:
            rotate_inputs(model.get_submodule(name).weight, self._factored)
        ctx.rotate_stream(self._rotation)
        program.rotations.residual = description

    def _learn(self, program: Program, ctx: Context, start: str) -> str:
        """Replace the Hadamard R1 (and R2) by the ones learned from them; the description of what the stream is
        rotated by."""
        learner = RotationLearner(program, ctx, self.learn, self.heads, self.online_down, self._head_rotation)
        learned = learner.learn(self._rotation)
        self._rotation = self._factored = learned.residual
        self._learned_heads = learned.heads
        heads = f" and the head rotations of {len(learned.heads)} attention layers" if learned.heads else ""
        ctx.report.note(f"rotate: residual rotation{heads} learned from the Hadamard in {self.learn.iterations} Cayley "
                        f"steps (lr {self.learn.lr}) on {len(learner.positions)} calibration batches: quantized-model "
                        f"KL to float {learned.start_loss:.4g} -> {learned.loss:.4g}")
        ctx.report.metrics["rotate.learn.kl_start"], ctx.report.metrics["rotate.learn.kl"] = learned.start_loss, learned.loss
        return f"rotation learned from the {start}"

    def _untie_head(self, program: Program, ctx: Context) -> None:
        """The head will be (E∘g)·R and the embedding E·R: two different tensors from now on."""
        head = program.model.get_submodule(program.head)
        if any(head.weight is program.model.get_submodule(name).weight for name in program.embeddings):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            program.model.config.tie_word_embeddings = False
            program.tied_embeddings = False
            program.config_updates["tie_word_embeddings"] = False
            ctx.report.note("rotate: the tied embedding and head were untied (they now differ by the final norm's scale)")

    @torch.no_grad()
    def _rotate_head(self, program: Program) -> None:
        head = program.model.get_submodule(program.head)
        if program.head_norm is not None:
            norm = program.model.get_submodule(program.head_norm)
            if norm_has_affine_weight(norm):
                head.weight.copy_(folding.scaled_inputs(head.weight.float(), norm.weight).to(head.weight.dtype))
                norm.weight.fill_(1.0)
            check_rotatable_norm(norm, program.head_norm, self._rotation)
        rotate_inputs(head.weight, self._factored)

    def run_block(self, block: Block, ctx: Context) -> None:
        layers = stream_layers(block, block.graph_module, self.heads, self.online_down)
        for norm in layers.norm_readers:
            check_rotatable_norm(block.leaf(norm), block.qualified(norm), self._rotation)
        for name in layers.readers:
            rotate_inputs(layers.parameter(name), self._factored)
        for weight, bias in layers.writers:
            rotate_outputs(layers.parameter(weight), layers.parameter(bias), self._factored)
        for v_target, o_target, head_dim in layers.heads:  # each head's values become v·R2, which o_proj reads back
            v, learned = block.leaf(v_target), self._learned_heads.get(block.qualified(v_target))
            r2 = learned if learned is not None else self._head_rotation(head_dim)
            rotate_outputs(v.weight, v.bias, r2)
            rotate_inputs(block.leaf(o_target).weight, r2)
        if self.online_down:
            self._online_down(block, layers.online, ctx)
        if self.online_qk and block.role == "text":
            self._online_qk(block, ctx)

    def _head_rotation(self, head_dim: int) -> KroneckerRotation:
        if head_dim not in self._head_rotations:
            self._head_rotations[head_dim] = random_rotation(head_dim, self.seed + 1)[0]
        return self._head_rotations[head_dim]

    def _online_down(self, block: Block, online: dict[str, OnlineHadamard], ctx: Context) -> None:
        for target, transform in online.items():
            down = block.leaf(target)
            rotate_inputs(down.weight, transform.rotation())
            block.insert_input_node(target, block.rotation_target(target), transform.to(down.weight.device))
            self._record(block, ctx, target, transform)
        for target in find_experts(block.graph_module):
            experts = block.leaf(target)
            if getattr(experts, "down_transform", None) is not None:
                continue
            transform = OnlineHadamard(experts.down_proj.shape[-1]).to(experts.down_proj.device)
            rotate_inputs(experts.down_proj, transform.rotation())
            wrapped = experts if isinstance(experts, FakeQuantExperts) else FakeQuantExperts(experts, None)
            wrapped.down_transform = transform
            block.replace_leaf(target, wrapped)
            self._record(block, ctx, f"{target}.down_proj", transform)

    @staticmethod
    def _record(block: Block, ctx: Context, target: str, transform: OnlineHadamard) -> None:
        description = describe_hadamard(transform.order)
        ctx.report.note(f"rotate: online rotation before down projections of width {transform.order}: {description}")
        ctx.program.rotations.online[block.qualified(target)] = description

    @staticmethod
    def _online_qk(block: Block, ctx: Context) -> None:
        """One Hadamard per attention kernel on its query and key inputs (after RoPE), where fake_quant's kv_cache
        will put the key quantizer after it: the scales are calibrated on, and the cache holds, the rotated keys."""
        for kv in find_kv_inputs(block.graph_module):
            k_weight = block.leaf(kv.k).weight
            transform = QKHadamard(kv.head_dim, kv.k).to(k_weight.device)
            target = Block.qk_rotation_target(kv.kernel.name)
            for index in (0, 1):  # the kernel's query and key
                block.insert_argument_node(kv.kernel, index, target, transform)
            ctx.report.note(f"rotate: online rotation of queries and keys after RoPE (head_dim {kv.head_dim}): "
                            f"{describe_hadamard(kv.head_dim)}")
