"""The tiny diffusion transformers and pipelines run, save and reload offline, and call the transformer as documented."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_diffusion import (
    BLOCK_LISTS,
    DIFFUSION_KINDS,
    capture_block_calls,
    iter_blocks,
    recording_calls,
    save_tiny_pipeline,
    tiny_call_kwargs,
    tiny_pipeline,
    tiny_transformer,
    tiny_transformer_inputs,
)

# (kind, two_experts): Wan 2.1 layout and the Wan2.2 A14B layout with transformer_2
PIPELINES = [(kind, False) for kind in DIFFUSION_KINDS] + [("wan", True)]


def latents_of(output) -> torch.Tensor:
    return output.frames if hasattr(output, "frames") else output.images


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_tiny_transformer_runs_on_its_inputs_and_predicts_latent_shaped_output(kind):
    model = tiny_transformer(kind)
    inputs = tiny_transformer_inputs(model, kind, batch=2)
    with torch.no_grad():
        (output,) = model(**inputs)
    assert output.shape == inputs["hidden_states"].shape
    assert output.dtype == torch.float32 and torch.isfinite(output).all()


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_tiny_transformer_is_determined_by_its_seed(kind):
    same, other = tiny_transformer(kind, seed=3).state_dict(), tiny_transformer(kind, seed=4).state_dict()
    again = tiny_transformer(kind, seed=3).state_dict()
    assert all(torch.equal(same[name], again[name]) for name in same)
    assert not all(torch.equal(same[name], other[name]) for name in same)


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_every_block_of_the_block_lists_runs_once_in_list_order(kind):
    model = tiny_transformer(kind)
    calls = capture_block_calls(model, kind, tiny_transformer_inputs(model, kind))
    assert [name for name, *_ in calls] == [name for name, _ in iter_blocks(model, kind)]
    assert {name.rsplit(".", 1)[0] for name, *_ in calls} == set(BLOCK_LISTS[kind])


@pytest.mark.parametrize(("kind", "two_experts"), PIPELINES)
def test_saved_pipeline_reloads_offline_and_reproduces_a_two_step_latent_call(kind, two_experts, tmp_path):
    pipe = tiny_pipeline(kind, two_experts=two_experts)
    save_tiny_pipeline(kind, tmp_path / kind, two_experts=two_experts)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / kind)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    expected = latents_of(pipe(**tiny_call_kwargs(kind)))
    actual = latents_of(reloaded(**tiny_call_kwargs(kind)))
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_pipeline_calls_the_transformer_with_keywords_only_at_every_step(kind):
    pipe = tiny_pipeline(kind)
    with recording_calls(pipe.transformer) as calls:
        pipe(**tiny_call_kwargs(kind, steps=2))
    calls_per_step = 2 if kind == "wan" else 1  # Wan: classifier-free guidance as a second call, not a 2x batch
    assert len(calls) == 2 * calls_per_step
    assert all("args" not in call and call["hidden_states"].shape[0] == 1 for call in calls)
    if kind != "wan":  # Flux and HunyuanVideo are guidance-distilled: guidance is an embedded input
        assert all(call["guidance"] is not None for call in calls)


def test_wan22_switches_from_transformer_to_transformer_2_at_the_boundary():
    pipe = tiny_pipeline("wan", two_experts=True)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    with recording_calls(pipe.transformer) as high, recording_calls(pipe.transformer_2) as low:
        pipe(**tiny_call_kwargs("wan", steps=3))
    assert high and low and len(high) + len(low) == 3 * 2
    assert all(call["timestep"].item() >= boundary for call in high)
    assert all(call["timestep"].item() < boundary for call in low)
