"""Tiny, seeded, random-initialised vision-language and omni models of the real transformers classes.

Companion of tiny_models.py for multimodal families: each model runs the real modeling code (vision
tower with windowed and full-attention blocks or deepstack mergers, audio encoder, MoE text) in
milliseconds, initialised the same way (norm weights around 1, other weights 0.02·randn). One
special-token table serves every kind, so a model, its synthetic inputs and its offline processor
files agree on every image/audio token id. Models, inputs and processors share that table and the
patch geometry, which is why they live in one module.

Every batch a compile uses must have the same number of images and the same image size: traced
vision blocks fix the number of images and windows (cu_seqlens chunks).

transformers 5.x builds none of these processor classes without torchvision (each takes a video
processor, and video processors need torchvision); without it, save_tiny_multimodal writes the same
files from the sub-processors and processor_inputs reproduces the processor's output from them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from tiny_tokenizer import train_byte_level_bpe
from tokenizers import AddedToken, Tokenizer
from torch import nn
from transformers import (
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Tokenizer,
    TokenizersBackend,
    WhisperFeatureExtractor,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

MULTIMODAL_KINDS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v_moe", "qwen2_5_omni", "qwen3_omni_moe")
OMNI_KINDS = ("qwen2_5_omni", "qwen3_omni_moe")

VOCAB_SIZE = 512
HIDDEN_SIZE = 64

# Every kind's tokenizer holds all of these at ids 0.., so an id never depends on the kind.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",    # Qwen VL / Qwen3-Omni
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",                      # Qwen3-Omni audio
    "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",             # Qwen2.5-Omni vision
    "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>",                            # Qwen2.5-Omni audio
    "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",                    # GLM-4.xV
    "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
    "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>",
)
TOKEN_ID = {token: index for index, token in enumerate(SPECIAL_TOKENS)}

# The tokenizer attributes each processor reads (`tokenizer.image_token`, `.vision_bos_token`, ...).
_QWEN_VL_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_MEDIA_TOKENS: dict[str, dict[str, str]] = {
    "qwen2_5_vl": _QWEN_VL_TOKENS,
    "qwen3_vl": _QWEN_VL_TOKENS,
    "qwen3_vl_moe": _QWEN_VL_TOKENS,
    "glm4v_moe": {"image_token": "<|image|>", "video_token": "<|video|>",
                  "vision_start_token": "<|begin_of_image|>", "vision_end_token": "<|end_of_image|>"},
    "qwen2_5_omni": {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                     "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                     "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    "qwen3_omni_moe": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                       "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"},
}

# One image is GRID x GRID patches; merging 2x2 gives GRID²/4 image tokens. Qwen2.5 windows are 2x2
# merged patches (window_size 56 px), so an image is 4 windows and the windowed blocks see another
# cu_seqlens than the full-attention blocks 1 and 3.
GRID = 8
MERGE = 2
TEMPORAL_PATCH = 2
AUDIO_MEL_BINS = 128
SAMPLING_RATE = 16000
HOP_LENGTH = 160
AUDIO_FRAMES = SAMPLING_RATE // HOP_LENGTH  # one second of audio

_TEXT = {
    "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN_SIZE, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "pad_token_id": TOKEN_ID["<|endoftext|>"], "bos_token_id": TOKEN_ID["<|im_start|>"],
    "eos_token_id": TOKEN_ID["<|im_end|>"],
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
        "norm_topk_prob": True}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "spatial_merge_size": MERGE,
           "temporal_patch_size": TEMPORAL_PATCH, "out_hidden_size": HIDDEN_SIZE}
_QWEN3_VISION = {**_VISION, "depth": 2, "patch_size": 16, "num_position_embeddings": GRID * GRID,
                 "deepstack_visual_indexes": [0, 1], "hidden_act": "gelu_pytorch_tanh"}
_QWEN2_5_VISION = {**_VISION, "depth": 4, "patch_size": 14, "window_size": 14 * MERGE * 2,
                   "fullatt_block_indexes": [1, 3], "hidden_act": "silu"}
_AUDIO = {"num_mel_bins": AUDIO_MEL_BINS, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
          "d_model": 32, "output_dim": HIDDEN_SIZE}
_QWEN_IDS = {"image_token_id": TOKEN_ID["<|image_pad|>"], "video_token_id": TOKEN_ID["<|video_pad|>"],
             "vision_start_token_id": TOKEN_ID["<|vision_start|>"], "vision_end_token_id": TOKEN_ID["<|vision_end|>"]}


def _rope(section: list[int], **extra: Any) -> dict[str, Any]:
    """M-RoPE parameters: `section` splits head_dim/2 (of the rotary part) into temporal/height/width."""
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


# kind -> (config class, model class, processor class, video processor class, config kwargs)
_KINDS: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   "Qwen2VLVideoProcessor",
                   {"text_config": {**_TEXT, "rope_parameters": _rope([2, 3, 3])}, "vision_config": _QWEN2_5_VISION,
                    **_QWEN_IDS}),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
                 {"text_config": {**_TEXT, "head_dim": 16, "rope_parameters": _rope([4, 2, 2], mrope_interleaved=True)},
                  "vision_config": _QWEN3_VISION, **_QWEN_IDS}),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
                     "Qwen3VLVideoProcessor",
                     {"text_config": {**_TEXT, **_MOE, "head_dim": 16,
                                      "rope_parameters": _rope([4, 2, 2], mrope_interleaved=True)},
                      "vision_config": _QWEN3_VISION, **_QWEN_IDS}),
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor", "Glm4vVideoProcessor",
                  {"text_config": {**_TEXT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                   "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                   "rope_parameters": _rope([2, 1, 1], partial_rotary_factor=0.5)},
                   "vision_config": {**_VISION, "depth": 2, "patch_size": 14, "image_size": GRID * 14},
                   "image_token_id": TOKEN_ID["<|image|>"], "video_token_id": TOKEN_ID["<|video|>"],
                   "image_start_token_id": TOKEN_ID["<|begin_of_image|>"],
                   "image_end_token_id": TOKEN_ID["<|end_of_image|>"],
                   "video_start_token_id": TOKEN_ID["<|begin_of_video|>"],
                   "video_end_token_id": TOKEN_ID["<|end_of_video|>"]}),
    # Omni thinker configs declare no vision_start/end ids, but get_rope_index reads them: pass them anyway.
    "qwen2_5_omni": ("Qwen2_5OmniThinkerConfig", "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniProcessor",
                     "Qwen2VLVideoProcessor",
                     {"text_config": {**_TEXT, "rope_parameters": _rope([2, 3, 3])}, "vision_config": _QWEN2_5_VISION,
                      "audio_config": {**_AUDIO, "n_window": 100},
                      "image_token_index": TOKEN_ID["<|IMAGE|>"], "video_token_index": TOKEN_ID["<|VIDEO|>"],
                      "audio_token_index": TOKEN_ID["<|AUDIO|>"], "audio_start_token_id": TOKEN_ID["<|audio_bos|>"],
                      "audio_end_token_id": TOKEN_ID["<|audio_eos|>"],
                      "vision_start_token_id": TOKEN_ID["<|vision_bos|>"],
                      "vision_end_token_id": TOKEN_ID["<|vision_eos|>"], "user_token_id": TOKEN_ID["<|im_start|>"]}),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeThinkerForConditionalGeneration",
                       "Qwen3OmniMoeProcessor", "Qwen2VLVideoProcessor",
                       {"text_config": {**_TEXT, **_MOE, "head_dim": 16, "rope_parameters": _rope(
                           [4, 2, 2], mrope_interleaved=True, interleaved=True)},
                        "vision_config": _QWEN3_VISION,
                        "audio_config": {**_AUDIO, "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500,
                                         "downsample_hidden_size": 16},
                        "image_token_id": TOKEN_ID["<|image_pad|>"], "video_token_id": TOKEN_ID["<|video_pad|>"],
                        "audio_token_id": TOKEN_ID["<|audio_pad|>"],
                        "audio_start_token_id": TOKEN_ID["<|audio_start|>"],
                        "audio_end_token_id": TOKEN_ID["<|audio_end|>"],
                        "vision_start_token_id": TOKEN_ID["<|vision_start|>"],
                        "vision_end_token_id": TOKEN_ID["<|vision_end|>"], "user_token_id": TOKEN_ID["<|im_start|>"]}),
}
_NEEDS_MM_TOKEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v_moe")


def _check_kind(kind: str) -> None:
    if kind not in MULTIMODAL_KINDS:
        raise ValueError(f"unknown multimodal kind {kind!r}; expected one of {MULTIMODAL_KINDS}")


def media_tokens(kind: str) -> dict[str, str]:
    """The media token strings of `kind`, keyed by the tokenizer attribute its processor reads."""
    _check_kind(kind)
    return dict(_MEDIA_TOKENS[kind])


def patch_size(kind: str) -> int:
    """Pixels per patch side of `kind`'s vision tower (Qwen3 families: 16, others 14)."""
    _check_kind(kind)
    return 16 if kind in ("qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe") else 14


def model_class(kind: str) -> type[PreTrainedModel]:
    """The transformers class of `kind` (what `from_pretrained` of a saved tiny directory needs)."""
    _check_kind(kind)
    return getattr(transformers, _KINDS[kind][1])


def tiny_multimodal_config(kind: str) -> Any:
    """The config of the tiny `kind` model: sdpa attention, batched_mm experts."""
    _check_kind(kind)
    config = getattr(transformers, _KINDS[kind][0])(**_KINDS[kind][4])
    config._attn_implementation = "sdpa"  # both setters recurse into the sub-configs
    config._experts_implementation = "batched_mm"  # the default grouped_mm does not fx-trace
    return config


def tiny_multimodal_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny `kind` model (one of MULTIMODAL_KINDS) in eval mode, in `dtype`."""
    config = tiny_multimodal_config(kind)
    torch.manual_seed(seed)
    model = model_class(kind)(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = model.get_submodule(name.rpartition(".")[0])
            if "Norm" in type(owner).__name__ and name.endswith("weight"):
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=generator))
            elif not isinstance(owner, nn.Embedding):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def audio_token_count(kind: str, frames: int) -> int:
    """Audio placeholder tokens for `frames` mel frames: the length the audio encoder outputs."""
    if kind == "qwen2_5_omni":  # stride-2 conv, then 2x average pooling
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1
    if kind == "qwen3_omni_moe":  # three stride-2 convs per chunk of 2·n_window = 100 frames (13 tokens each)
        rest = (frames % 100 - 1) // 2 + 1
        return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13
    raise ValueError(f"{kind!r} has no audio encoder")


def tiny_multimodal_inputs(
    model: PreTrainedModel, kind: str, *, images: int = 1, seed: int = 0, audio: bool = False, batch: int = 1,
    text_tokens: int = 4, pad: int = 2,
) -> dict[str, torch.Tensor]:
    """Model-forward kwargs: `batch` rows, each with `images` GRID x GRID images (and a 1-second clip).

    A row is `<|im_start|> text (start image×GRID²/4 end text)×images [audio_start audio×n audio_end] <|im_end|>`;
    with batch > 1 the first row is left-padded by `pad` tokens. Token ids come from `model.config`.
    """
    _check_kind(kind)
    if audio and kind not in OMNI_KINDS:
        raise ValueError(f"{kind!r} has no audio encoder")
    config = model.config
    image_id, per_image = config.image_token_id, GRID * GRID // MERGE**2
    start_id = config.image_start_token_id if kind == "glm4v_moe" else config.vision_start_token_id
    end_id = config.image_end_token_id if kind == "glm4v_moe" else config.vision_end_token_id
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (n,), generator=generator).tolist()

    rows = []
    for _ in range(batch):
        ids = [TOKEN_ID["<|im_start|>"], *text(text_tokens)]
        for _ in range(images):
            ids += [start_id, *[image_id] * per_image, end_id, *text(text_tokens)]
        if audio:
            count = audio_token_count(kind, AUDIO_FRAMES)
            ids += [config.audio_start_token_id, *[config.audio_token_id] * count, config.audio_end_token_id]
        rows.append([*text(pad), *ids, TOKEN_ID["<|im_end|>"]] if batch > 1 else [*ids, TOKEN_ID["<|im_end|>"]])
    input_ids = torch.tensor(rows)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        input_ids[0, :pad] = TOKEN_ID["<|endoftext|>"]
        attention_mask[0, :pad] = 0
    patch, count = patch_size(kind), batch * images
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(count * GRID * GRID, 3 * TEMPORAL_PATCH * patch**2, generator=generator),
        "image_grid_thw": torch.tensor([[1, GRID, GRID]] * count),
    }
    if kind in _NEEDS_MM_TOKEN_TYPES:  # 0 text, 1 image, 2 video
        inputs["mm_token_type_ids"] = (input_ids == image_id).long()
    if audio:
        inputs["input_features"] = torch.randn(batch, AUDIO_MEL_BINS, AUDIO_FRAMES, generator=generator)
        inputs["feature_attention_mask"] = torch.ones(batch, AUDIO_FRAMES, dtype=torch.long)
    return inputs


# ---------------------------------------------------------------- offline processors

_TRAINING_TEXT = (
    "Describe this image in one sentence.",
    "What is in the picture? A small red square on a white background.",
    "Listen to the audio and tell me what you hear.",
    "The quick brown fox jumps over the lazy dog, 12 times.",
    "You are a helpful assistant.",
)
# The pre-tokenizer split Qwen2Tokenizer builds, so the trained merges are the ones it applies.
_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
          r"""|\s+(?!\S)|\s+""")
# Qwen-style turns (GLM: [gMASK]<sop><|role|>); image/video/audio items become their placeholder tokens.
_CHAT_TEMPLATE = (
    "{{ PREFIX }}{% for message in messages %}{{ OPEN }}{{ message['role'] }}{{ CLOSE }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ VISION_START }}{{ IMAGE }}{{ VISION_END }}"
    "{% elif item['type'] == 'video' %}{{ VISION_START }}{{ VIDEO }}{{ VISION_END }}"
    "{% elif item['type'] == 'audio' %}{{ AUDIO_START }}{{ AUDIO }}{{ AUDIO_END }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ END }}{% endfor %}"
    "{% if add_generation_prompt %}{{ OPEN }}assistant{{ CLOSE }}{% endif %}"
)


def chat_template(kind: str) -> str:
    """A Jinja chat template for `kind` (Qwen turns; GLM turns for glm4v_moe) emitting its media tokens."""
    tokens, glm = media_tokens(kind), kind == "glm4v_moe"
    values = {
        "PREFIX": "[gMASK]<sop>" if glm else "", "OPEN": "<|" if glm else "<|im_start|>",
        "CLOSE": "|>\n" if glm else "\n", "END": "" if glm else "<|im_end|>\n",
        "VISION_START": tokens.get("vision_start_token", tokens.get("vision_bos_token")),
        "VISION_END": tokens.get("vision_end_token", tokens.get("vision_eos_token")),
        "IMAGE": tokens["image_token"], "VIDEO": tokens["video_token"], "AUDIO": tokens.get("audio_token", ""),
        "AUDIO_START": tokens.get("audio_bos_token", ""), "AUDIO_END": tokens.get("audio_eos_token", ""),
    }
    template = _CHAT_TEMPLATE
    for name, value in values.items():
        template = template.replace("{{ " + name + " }}", value)
    return template


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """A byte-level BPE over a few sentences, as JSON: SPECIAL_TOKENS (ids 0..), 256 bytes, then merges."""
    return train_byte_level_bpe(_TRAINING_TEXT, vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, split_pattern=_SPLIT)


def tiny_multimodal_tokenizer(kind: str) -> TokenizersBackend:
    """`kind`'s tokenizer class (Qwen2Tokenizer; GLM: TokenizersBackend) over a tiny BPE holding SPECIAL_TOKENS."""
    _check_kind(kind)
    special = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": None,
               "extra_special_tokens": media_tokens(kind)}
    if kind == "glm4v_moe":
        tokenizer = TokenizersBackend(tokenizer_object=Tokenizer.from_str(_trained_bpe()), **special)
    else:
        state = json.loads(_trained_bpe())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
        tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, **special)
    # Qwen2Tokenizer registers only its named special tokens; the rest must not split into bytes either.
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.chat_template = chat_template(kind)
    return tokenizer


def tiny_image_processor(kind: str) -> Any:
    """`kind`'s image processor (PIL backend, no torchvision): any square image becomes GRID x GRID patches."""
    area = (GRID * patch_size(kind)) ** 2 * (TEMPORAL_PATCH if kind == "glm4v_moe" else 1)  # GLM counts frames
    size = {"shortest_edge": int(0.9 * area), "longest_edge": int(1.2 * area)}
    cls = Glm4vImageProcessorPil if kind == "glm4v_moe" else Qwen2VLImageProcessorPil
    return cls(size=size, patch_size=patch_size(kind), temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE)


def _video_processor_settings(kind: str) -> dict[str, Any]:
    area = (GRID * patch_size(kind)) ** 2 * TEMPORAL_PATCH
    return {"size": {"shortest_edge": area, "longest_edge": 4 * area}, "patch_size": patch_size(kind),
            "temporal_patch_size": TEMPORAL_PATCH, "merge_size": MERGE}


def tiny_video_processor(kind: str) -> Any:
    """`kind`'s video processor; transformers' video processors all need torchvision (ImportError without)."""
    _check_kind(kind)
    if not is_torchvision_available():
        raise ImportError(f"the {kind} processor takes a video processor, and video processors need torchvision")
    return getattr(transformers, _KINDS[kind][3])(**_video_processor_settings(kind))


def tiny_feature_extractor(kind: str) -> WhisperFeatureExtractor:
    """The omni thinkers' Whisper log-mel extractor, with 2-second chunks (200 frames) instead of 30."""
    if kind not in OMNI_KINDS:
        raise ValueError(f"{kind!r} has no audio encoder")
    return WhisperFeatureExtractor(feature_size=AUDIO_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                   chunk_length=2, n_fft=400, return_attention_mask=True)


def tiny_multimodal_processor(kind: str) -> ProcessorMixin:
    """The real processor class of `kind` over the tiny sub-processors (needs torchvision, see module doc)."""
    parts = {"image_processor": tiny_image_processor(kind), "tokenizer": tiny_multimodal_tokenizer(kind),
             "video_processor": tiny_video_processor(kind), "chat_template": chat_template(kind)}
    if kind in OMNI_KINDS:
        parts["feature_extractor"] = tiny_feature_extractor(kind)
    return getattr(transformers, _KINDS[kind][2])(**parts)


def save_tiny_multimodal(kind: str, directory: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A complete tiny `kind` directory: model.safetensors (in `dtype`), config, tokenizer and processor files.

    With torchvision the real processor writes its files. Without it the same layout is written from
    the sub-processors: tokenizer.json, tokenizer_config.json, chat_template.jinja and
    processor_config.json (every sub-processor's settings nested; the video processor's by class
    name and sizes), which AutoProcessor loads wherever torchvision is installed.
    """
    directory = Path(directory)
    tiny_multimodal_model(kind, seed=seed, dtype=dtype).save_pretrained(directory)
    if is_torchvision_available():
        tiny_multimodal_processor(kind).save_pretrained(directory)
        return directory
    tokenizer = tiny_multimodal_tokenizer(kind)
    tokenizer.init_kwargs["processor_class"] = _KINDS[kind][2]
    tokenizer.save_pretrained(directory)
    config: dict[str, Any] = {
        "processor_class": _KINDS[kind][2],
        "image_processor": tiny_image_processor(kind).to_dict(),
        "video_processor": {"video_processor_type": _KINDS[kind][3], **_video_processor_settings(kind)},
    }
    if kind in OMNI_KINDS:
        config["feature_extractor"] = tiny_feature_extractor(kind).to_dict()
    (directory / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _expand(text: str, token: str, counts: Any) -> str:
    """`text` with its n-th `token` repeated next(counts) times."""
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + piece for piece in pieces[1:])


def processor_inputs(
    kind: str, tokenizer: Any, image_processor: Any, text: list[str], images: list[Image.Image],
    feature_extractor: Any = None, audio: list[np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """What `kind`'s processor returns, computed from its sub-processors alone (works without torchvision).

    Each image token in `text` becomes one token per merged patch of the next image, each audio token
    one per audio-encoder output frame; `mm_token_type_ids` marks image tokens where the class reads it.
    """
    tokens = media_tokens(kind)
    vision = image_processor(images=images, return_tensors="pt")
    image_counts = iter((vision["image_grid_thw"].prod(-1) // MERGE**2).tolist())
    text = [_expand(t, tokens["image_token"], image_counts) for t in text]
    inputs: dict[str, torch.Tensor] = {}
    if audio is not None:  # Qwen2.5-Omni pads and truncates to chunk_length; Qwen3-Omni pads to the longest clip
        padding = {"padding": "max_length"} if kind == "qwen2_5_omni" else {"padding": True, "truncation": False}
        features = feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_attention_mask=True,
                                     return_tensors="pt", **padding)
        audio_counts = iter(audio_token_count(kind, int(n)) for n in features["attention_mask"].sum(-1))
        text = [_expand(t, tokens["audio_token"], audio_counts) for t in text]
        inputs["input_features"] = features["input_features"]
        inputs["feature_attention_mask"] = features["attention_mask"]
    encoded = tokenizer(text, return_tensors="pt", padding=True,  # the omni processors pad on the left
                        padding_side="left" if kind in OMNI_KINDS else tokenizer.padding_side)
    inputs.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                  pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
    if kind in _NEEDS_MM_TOKEN_TYPES:
        image_id = tokenizer.convert_tokens_to_ids(tokens["image_token"])
        inputs["mm_token_type_ids"] = (encoded["input_ids"] == image_id).long()
    return inputs
