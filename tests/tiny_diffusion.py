"""Tiny, seeded, random-initialised diffusion transformers and pipelines of the real diffusers classes.

Three families: FLUX.1 (`FluxTransformer2DModel`), HunyuanVideo (`HunyuanVideoTransformer3DModel`)
and Wan 2.1/2.2 (`WanTransformer3DModel`). Each transformer has two heads of 16 channels (inner dim
32) and the block lists of the real model: Flux 2 double + 2 single blocks, HunyuanVideo 2 dual +
2 single + 2 token-refiner blocks, Wan 2 blocks. Weights are 0.02·randn; norm weights are drawn
around 1, as in tiny_models.py.

The pipelines are built fully offline: tiny CLIP / T5 / UMT5 / Llama text encoders with tokenizers
made from hand-written vocabularies (the real tokenizer classes, no download), tiny VAEs and the
schedulers of the real repositories, so that calibration can start from prompts.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    ModelMixin,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from module_calls import Call, module_calls
from tokenizers import pre_tokenizers
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

DIFFUSION_KINDS = ("flux", "hunyuan_video", "wan")

TEXT_DIM = 32  # hidden size of every tiny text encoder (T5/UMT5/Llama sequence embeddings, CLIP pooled)
TEXT_TOKENS = 8  # sequence length of encoder_hidden_states in tiny_transformer_inputs

# Block lists (dotted paths of nn.ModuleLists) in the order the transformer's forward runs them.
BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "hunyuan_video": ("context_embedder.token_refiner.refiner_blocks", "transformer_blocks",
                      "single_transformer_blocks"),
    "wan": ("blocks",),
}

_TRANSFORMERS: dict[str, tuple[type[ModelMixin], dict]] = {
    "flux": (FluxTransformer2DModel, {
        "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": TEXT_DIM,
        "pooled_projection_dim": TEXT_DIM, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
    }),
    "hunyuan_video": (HunyuanVideoTransformer3DModel, {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
        "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 2, "mlp_ratio": 2.0,
        "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True, "text_embed_dim": TEXT_DIM,
        "pooled_projection_dim": TEXT_DIM, "rope_axes_dim": (4, 6, 6),
    }),
    "wan": (WanTransformer3DModel, {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
        "out_channels": 16, "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
    }),
}


def _check_kind(kind: str) -> None:
    if kind not in DIFFUSION_KINDS:
        raise ValueError(f"unknown diffusion kind {kind!r}; expected one of {DIFFUSION_KINDS}")


def _randomise(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """std·randn for every parameter, except norm weights, which are drawn around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if "Norm" in type(owner).__name__ and leaf == "weight":
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))


def tiny_transformer(kind: str, seed: int = 0, *, weight_std: float = 0.02) -> ModelMixin:
    """The tiny float32 transformer of `kind` (one of DIFFUSION_KINDS), in eval mode.

    With the default `weight_std` the blocks barely change the output (the AdaLN gates are ~0.02);
    0.3 gives gates and block updates of order one, so that quantizing the blocks shows in the output.
    """
    _check_kind(kind)
    model_cls, config = _TRANSFORMERS[kind]
    torch.manual_seed(seed)
    model = model_cls(**config)
    _randomise(model, seed + 1, weight_std)
    return model.eval()


def tiny_transformer_inputs(model: ModelMixin, kind: str, *, batch: int = 1, seed: int = 0) -> dict:
    """Forward kwargs for `model` as its pipeline passes them (dtypes and value ranges included).

    Latents are 2 frames of 4x4 (video) or a 4x4 packed grid (Flux); the text is TEXT_TOKENS tokens.
    HunyuanVideo's text mask pads the last 3 tokens of the first sample, as a padded prompt does.
    """
    _check_kind(kind)
    config = model.config
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    text = randn(batch, TEXT_TOKENS, TEXT_DIM)
    if kind == "flux":
        grid = 4  # packed latent grid (the pipeline's latent grid is 2·grid)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return {
            "hidden_states": randn(batch, grid * grid, config.in_channels),
            "encoder_hidden_states": text,
            "pooled_projections": randn(batch, TEXT_DIM),
            "timestep": torch.full((batch,), 0.75),  # the pipeline passes t / 1000
            "img_ids": img_ids,
            "txt_ids": torch.zeros(TEXT_TOKENS, 3),
            "guidance": torch.full((batch,), 3.5),
            "return_dict": False,
        }
    latents = randn(batch, config.in_channels, 2, 4, 4)
    if kind == "wan":  # UniPC (Wan's scheduler) yields int64 timesteps in [0, 1000)
        timestep = torch.full((batch,), 750, dtype=torch.int64)
        return {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": text, "return_dict": False}
    mask = torch.ones(batch, TEXT_TOKENS)  # the pipeline casts the tokenizer's mask to the transformer dtype
    mask[0, -3:] = 0
    return {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 750.0),  # FlowMatchEuler's t in (0, 1000]
        "encoder_hidden_states": text,
        "encoder_attention_mask": mask,
        "pooled_projections": randn(batch, TEXT_DIM),
        "guidance": torch.full((batch,), 6.0 * 1000.0),  # the pipeline passes guidance_scale · 1000
        "return_dict": False,
    }


def iter_blocks(model: nn.Module, kind: str) -> Iterator[tuple[str, nn.Module]]:
    """`(dotted name, block)` for every block of `model`, in the order the forward runs them."""
    for list_name in BLOCK_LISTS[kind]:
        for index, block in enumerate(model.get_submodule(list_name)):
            yield f"{list_name}.{index}", block


def capture_block_calls(model: nn.Module, kind: str, inputs: dict) -> list[Call]:
    """`(name, args, kwargs, output)` of every block call during one forward of `model` on `inputs`."""
    return module_calls(iter_blocks(model, kind), lambda: model(**inputs))


@contextlib.contextmanager
def recording_calls(module: nn.Module) -> Iterator[list[dict]]:
    """Collect the kwargs (and positional args under "args") of every call of `module` meanwhile."""
    calls: list[dict] = []

    def record(_: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append({**kwargs, "args": args} if args else dict(kwargs))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- tokenizers, built from hand-written vocabularies (no download, any printable text encodes) ---

_CHARS = string.ascii_letters + string.digits + string.punctuation


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE without merges: every byte, alone or word-final (`</w>`)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({char: len(vocab) + i for i, char in enumerate(alphabet)})
    vocab.update({f"{char}</w>": len(vocab) + i for i, char in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram over printable characters, word-initial (`▁c`) preferred; serves T5 and UMT5."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{char}", -3.0) for char in _CHARS] + [(char, -4.0) for char in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def llama_tokenizer() -> LlamaTokenizer:
    """SentencePiece-style BPE with byte fallback; adds bos and pads on the right, as HunyuanVideo's does."""
    tokens = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    tokens += list(_CHARS) + [f"▁{char}" for char in _CHARS]
    merges = [("▁", char) for char in _CHARS]
    return LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token="<pad>",
                          add_bos_token=True, padding_side="right", model_max_length=512)


def _clip_text_model(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, projection_dim=TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _t5_sizes(tokenizer: T5Tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "d_model": TEXT_DIM, "d_kv": 16, "d_ff": 64, "num_layers": 2,
            "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
            "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


# --- pipelines ---


def _flux_pipeline(transformer: ModelMixin) -> FluxPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=_clip_text_model(tokenizer), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**_t5_sizes(tokenizer_2))), tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _hunyuan_video_pipeline(transformer: ModelMixin) -> HunyuanVideoPipeline:
    tokenizer, tokenizer_2 = llama_tokenizer(), clip_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text_model(tokenizer_2), tokenizer_2=tokenizer_2,
    )


def _wan_pipeline(transformer: ModelMixin, transformer_2: ModelMixin | None) -> WanPipeline:
    tokenizer = t5_tokenizer()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=UMT5EncoderModel(UMT5Config(**_t5_sizes(tokenizer))), vae=vae,
        scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=None if transformer_2 is None else WAN22_BOUNDARY_RATIO,
    )


WAN22_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B: `transformer` runs while t >= 875, then `transformer_2`


def tiny_pipeline(kind: str, seed: int = 0, *, two_experts: bool = False, weight_std: float = 0.02) -> DiffusionPipeline:
    """The tiny float32 pipeline of `kind` around `tiny_transformer(kind, seed)`.

    `two_experts` (Wan only) builds the Wan2.2 A14B layout: a second transformer (`transformer_2`,
    seed + 1) for the low-noise steps and `boundary_ratio` in the pipeline config. `weight_std` is
    the transformers' (see `tiny_transformer`).
    """
    _check_kind(kind)
    if two_experts and kind != "wan":
        raise ValueError("only the Wan pipeline has two experts")
    transformer = tiny_transformer(kind, seed, weight_std=weight_std)
    torch.manual_seed(seed + 2)  # text encoders and VAE keep their own initialisation, seeded
    if kind == "flux":
        pipe = _flux_pipeline(transformer)
    elif kind == "hunyuan_video":
        pipe = _hunyuan_video_pipeline(transformer)
    else:
        pipe = _wan_pipeline(transformer, tiny_transformer(kind, seed + 1, weight_std=weight_std) if two_experts else None)
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(kind: str, directory: str | Path, seed: int = 0, *, two_experts: bool = False,
                       weight_std: float = 0.02, dtype: torch.dtype = torch.float32) -> Path:
    """A complete diffusers pipeline directory (model_index.json, one subfolder per component, safetensors),
    every component's weights stored in `dtype`, as bfloat16 checkpoints ship."""
    directory = Path(directory)
    pipe = tiny_pipeline(kind, seed, two_experts=two_experts, weight_std=weight_std).to(dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_call_kwargs(kind: str, *, steps: int = 2, seed: int = 0) -> dict:
    """Arguments for a cheap pipeline call that returns latents: a prompt, `steps` steps, tiny sizes."""
    _check_kind(kind)
    kwargs = {
        "prompt": "a photo of a cat",
        "num_inference_steps": steps,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }
    if kind == "flux":  # 16x16 pixels -> 8x8 latents -> 4x4 packed tokens
        return {**kwargs, "height": 16, "width": 16, "max_sequence_length": 16, "guidance_scale": 3.5}
    video = {"height": 32, "width": 32, "num_frames": 5}  # -> latents of 2 frames, 4x4; 8 tokens of 2x2 patches
    if kind == "wan":  # guidance_scale > 1: classifier-free guidance with the default negative prompt ""
        return {**kwargs, **video, "max_sequence_length": 16, "guidance_scale": 5.0}
    return {**kwargs, **video, "max_sequence_length": 16, "guidance_scale": 6.0,
            "prompt_template": hunyuan_prompt_template()}


def hunyuan_prompt_template(prefix: str = "Describe the video:") -> dict:
    """A prompt template for the tiny Llama tokenizer: `crop_start` drops exactly the prefix tokens.

    The pipeline's default template sets `crop_start=95` for the real tokenizer; with the tiny one
    its 111-token window (16 + 95) would hold only template tokens, the same for every prompt.
    """
    return {"template": prefix + "{}", "crop_start": len(llama_tokenizer()(prefix).input_ids)}
