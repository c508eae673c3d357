"""Stage capture: each block's inputs are rebuilt from the previous block's outputs, as the model wires them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimc.errors import TraceError
from slimc.ir.capture import capture_stage
from slimc.ir.hooks import temporary_hooks


class JointBlock(nn.Module):
    """Two streams in, returned in the other order (as Flux double blocks return (context, image))."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(8, 8)
        self.context = nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states, temb, window=None):
        shift = temb if window is None else temb + window
        return self.context(encoder_hidden_states) + shift, self.image(hidden_states) - shift


class JointModel(nn.Module):
    """Three joint blocks; the model adds a per-batch feature between blocks 0 and 1, and block 2 gets its own input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(JointBlock() for _ in range(3))

    def forward(self, x, context, temb, feature, window):
        for index, block in enumerate(self.blocks):
            context, x = block(x, context, temb, window=window * 2 if index == 2 else None)
            if index == 0:
                x = x + feature
        return x


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(2, 8, generator=g) for name in ("x", "context", "temb", "feature", "window")}


def _replay(model: JointModel, batch: dict, perturb: float) -> torch.Tensor:
    """Run the blocks from captured inputs, changing each block's outputs, as quantization would."""
    stage = capture_stage(list(model.blocks), [lambda: model(**batch)])
    args, kwargs = stage.first[0]
    outputs = None
    for index, block in enumerate(model.blocks):
        if index:
            args, kwargs = stage.next_inputs(index, 0, outputs)
        outputs = tuple(o + perturb for o in block(*args, **kwargs))
    return outputs[1]


def _reference(model: JointModel, batch: dict, perturb: float) -> torch.Tensor:
    """The same model with every block's outputs changed by `perturb`."""
    handles = [b.register_forward_hook(lambda m, a, out: tuple(o + perturb for o in out)) for b in model.blocks]
    try:
        return model(**batch)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_rebuilt_inputs_follow_swapped_streams_injections_and_per_block_inputs():
    model = JointModel()
    batch = _batch(1)
    for perturb in (0.0, 0.5):
        torch.testing.assert_close(_replay(model, batch, perturb), _reference(model, batch, perturb), rtol=0, atol=1e-6)


@torch.no_grad()
def test_a_stage_whose_later_blocks_read_only_outputs_and_shared_inputs_is_uniform():
    model = JointModel()

    def shared_only(x, context, temb):
        for block in model.blocks:
            context, x = block(x, context, temb)
        return x

    batches = [_batch(seed) for seed in range(3)]
    stage = capture_stage(list(model.blocks), [lambda b=b: shared_only(b["x"], b["context"], b["temb"]) for b in batches])
    assert stage.uniform
    args, kwargs = stage.next_inputs(1, 2, (torch.zeros(2, 8), torch.ones(2, 8)))
    assert torch.equal(args[0], torch.ones(2, 8)) and torch.equal(args[1], torch.zeros(2, 8))
    assert torch.equal(args[2], batches[2]["temb"])


@torch.no_grad()
def test_a_batch_that_stops_before_the_stage_ends_is_an_error():
    model = JointModel()

    def two_blocks(batch):
        x, context = batch["x"], batch["context"]
        for block in list(model.blocks)[:2]:
            context, x = block(x, context, batch["temb"])
        return x

    with pytest.raises(TraceError, match="reached 2 of the stage's 3 blocks"):
        capture_stage(list(model.blocks), [lambda: two_blocks(_batch(0))])


@torch.no_grad()
def test_batches_that_never_reach_a_stage_are_left_out_of_it():
    model = JointModel()
    batches = [_batch(0), _batch(1)]
    stage = capture_stage(list(model.blocks), [lambda: None, lambda: model(**batches[1])])
    assert len(stage.first) == 1 and torch.equal(stage.first[0][0][0], batches[1]["x"])
    with pytest.raises(TraceError, match="no calibration batch reaches stage 'vision'"):
        capture_stage(list(model.blocks), [lambda: None], stage="stage 'vision'")


@torch.no_grad()
def test_temporary_hooks_run_while_open_and_are_removed_on_exit_even_after_an_error():
    layer, seen = nn.Linear(2, 2), []
    with pytest.raises(RuntimeError, match="the run failed"), temporary_hooks() as hooks:
        hooks.before(layer, lambda m, args: seen.append("before"))
        hooks.after(layer, lambda m, args, kwargs, output: seen.append("after"), with_kwargs=True)
        layer(torch.ones(2))
        raise RuntimeError("the run failed")
    layer(torch.ones(2))
    assert seen == ["before", "after"]
    assert not layer._forward_pre_hooks and not layer._forward_hooks
