"""The tiny multimodal models run, and their saved directories reload offline like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_multimodal import (
    MULTIMODAL_KINDS,
    OMNI_KINDS,
    VOCAB_SIZE,
    media_tokens,
    model_class,
    processor_inputs,
    save_tiny_multimodal,
    tiny_multimodal_inputs,
    tiny_multimodal_model,
)
from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved directory per kind; treat as read-only."""
    root = tmp_path_factory.mktemp("multimodal")
    return {kind: save_tiny_multimodal(kind, root / kind) for kind in MULTIMODAL_KINDS}


def _prompt(kind: str) -> tuple[list[str], list[Image.Image], list[np.ndarray] | None]:
    """One chat-formatted prompt with a 90-pixel image (and a 1-second tone for omni thinkers)."""
    tokens = media_tokens(kind)
    start = tokens.get("vision_start_token", tokens.get("vision_bos_token"))
    end = tokens.get("vision_end_token", tokens.get("vision_eos_token"))
    text = f"<|im_start|>user\nWhat is {start}{tokens['image_token']}{end} this?<|im_end|>"
    audio = None
    if kind in OMNI_KINDS:
        text += f"{tokens['audio_bos_token']}{tokens['audio_token']}{tokens['audio_eos_token']}"
        audio = [np.sin(np.arange(16000, dtype=np.float32) / 20)]
    image = Image.fromarray((np.random.default_rng(0).random((90, 90, 3)) * 255).astype(np.uint8))
    return [text], [image], audio


@pytest.mark.parametrize("kind", MULTIMODAL_KINDS)
def test_forward_runs_on_tiny_inputs(kind: str) -> None:
    model = tiny_multimodal_model(kind)
    audio = kind in OMNI_KINDS
    inputs = tiny_multimodal_inputs(model, kind, batch=2, audio=audio)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", MULTIMODAL_KINDS)
def test_saved_directory_reloads_offline(kind: str, saved: dict[str, Path]) -> None:
    directory = saved[kind]
    assert (directory / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(directory).model_type == tiny_multimodal_model(kind).config.model_type
    model = model_class(kind).from_pretrained(directory, experts_implementation="batched_mm").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    extractor = AutoFeatureExtractor.from_pretrained(directory) if kind in OMNI_KINDS else None
    assert tokenizer.convert_tokens_to_ids(media_tokens(kind)["image_token"]) == model.config.image_token_id
    text, images, audio = _prompt(kind)
    inputs = processor_inputs(kind, tokenizer, image_processor, text, images, extractor, audio)
    assert int(inputs["input_ids"].max()) < VOCAB_SIZE
    with torch.no_grad():
        reloaded = model(**inputs, use_cache=False).logits
        original = tiny_multimodal_model(kind)(**inputs, use_cache=False).logits
    torch.testing.assert_close(reloaded, original, rtol=0, atol=0)
