"""Omni thinkers: Qwen2.5-Omni and Qwen3-Omni (the part that reads text, images and audio and writes text).

Omni releases are whole models (config `Qwen2_5OmniConfig` / `Qwen3OmniMoeConfig`; tensors `thinker.*`,
`talker.*`, `token2wav.*` / `code2wav.*`); thinker-only directories exist too. Either way only the
thinker class is loaded (its `from_pretrained` takes `thinker_config` and the `thinker.` tensors) and
cut into stages in the order one forward runs them: the audio encoder's layers, then the vision
stages and the text decoder of `MultimodalLLM`. The audio convolutions, the encoder's output
projections and the vision mergers' Linears of Qwen3-Omni's audio tower sit outside the layers and
stay float.

From a whole checkpoint the program records the checkpoint's other tensors (`Program.source_tensors`), which
an export copies unchanged; the thinker's own tensors keep their checkpoint names (`thinker.*`: transformers' save conversion restores the prefix its loading took
off), so the output loads in place of the original.

Calibration samples hold an image and/or a clip with text (slimc.frontends.audio): the default `builtin:omni`
gives every sample both, so one compile calibrates the audio encoder, the vision tower and the text
decoder. Samples are batched with others of the same media (a traced encoder is specialised to its
inputs' structure); batches with images come first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoFeatureExtractor, PretrainedConfig

from slimc.config import CalibrationConfig
from slimc.errors import DataError, ModelLoadError
from slimc.frontends.audio import (
    BUILTIN_AUDIO_SPECS,
    OMNI_SPECS,
    MediaSample,
    holds_media,
    load_media_samples,
    qwen2_5_omni_audio_tokens,
    qwen3_omni_audio_tokens,
)
from slimc.frontends.llm import text_batches
from slimc.frontends.multimodal import (
    SEQUENCE_KEYS,
    ComposedProcessor,
    MultimodalLLM,
    batch_rows,
    model_ready_batches,
    tower_of,
    width_keeping_list,
)
from slimc.ir import Block, Program, Stage
from slimc.ir.source import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    ModelSource,
    component_source,
    load_tokenizer,
)
from slimc.report import RunReport

THINKERS = ("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")
WHOLE_MODELS = ("Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration", "Qwen3OmniMoeForConditionalGeneration")


@dataclass(frozen=True)
class OmniFamily:
    """Per omni family, what the model's config does not say and the calibration data needs before the
    model runs: how its processor lays out audio, and the vision-start token of its prompts."""

    audio_tokens: Callable[[int, int], int]  # (valid mel frames, n_window) -> the audio encoder's output length
    cuts_clips_to_window: bool  # the processor pads and cuts every clip to the feature extractor's window
    vision_start_token: str  # for configs that leave out `vision_start_token_id`


OMNI_FAMILIES = {
    "qwen2_5_omni": OmniFamily(qwen2_5_omni_audio_tokens, cuts_clips_to_window=True, vision_start_token="<|vision_bos|>"),
    "qwen3_omni_moe": OmniFamily(qwen3_omni_audio_tokens, cuts_clips_to_window=False, vision_start_token="<|vision_start|>"),
}


def omni_family(config: PretrainedConfig) -> OmniFamily:
    """The rules of the family of a thinker's (or a whole omni model's) config."""
    family = OMNI_FAMILIES.get(config.model_type.removesuffix("_thinker"))
    if family is None:
        raise DataError(f"no omni rules for model type {config.model_type!r}; slimc reads Qwen2.5-Omni and Qwen3-Omni thinkers")
    return family


class OmniThinker(MultimodalLLM):
    name = "omni"
    architectures = (*THINKERS, *WHOLE_MODELS)
    description = "omni thinkers: audio encoder, vision tower, projector, text decoder (talker copied unchanged)"
    calibration_dataset = "builtin:omni"
    builtin_datasets = (*MultimodalLLM.builtin_datasets, *BUILTIN_AUDIO_SPECS, *OMNI_SPECS)
    trace_calibration = {"seq_len": 256, "image_size": 64, "audio_seconds": 1.0}  # room for one image's and one second's tokens
    evaluation_dataset = "builtin:omni-eval"

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str | dict[str, str] = "cpu",
             trust_remote_code: bool = False, offload_folder: Path | None = None) -> nn.Module:
        thinker, _ = component_source(source)
        _ensure_vision_start(source, thinker.config)
        return super().load(thinker, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                            offload_folder=offload_folder)

    def skeleton(self, source: ModelSource, dtype: torch.dtype) -> nn.Module:
        return super().skeleton(component_source(source)[0], dtype)

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        program = super().build(source, model)
        _, prefix = component_source(source)
        if prefix:  # a whole checkpoint: the exports copy its talker and vocoder unchanged
            program.source_tensors = {name: file for name, file in checkpoint_files(source.path).items()
                                      if not name.startswith(prefix)}
        return program

    def encoder_stages(self, model: nn.Module) -> list[Stage]:
        """The audio encoder's layers (a forward runs them first), then the vision blocks and mergers."""
        audio_config = model.config.audio_config
        tower_name, tower = tower_of(model, audio_config)
        name, layers = width_keeping_list(tower, audio_config.encoder_layers, audio_config.d_model, tower_name)
        audio = [Block(f"{tower_name}.{name}.{i}", layer, layers, i, role="audio") for i, layer in enumerate(layers)]
        return [Stage("audio", audio), *super().encoder_stages(model)]

    # ---------------------------------------------------------------------------------- calibration data

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        """Text-only data gives `{"input_ids"}` batches; media data the processor's outputs, `batch_size`
        samples of the same media to a batch (image-bearing batches first), rows of one length."""
        if (batches := model_ready_batches(calibration, report)) is not None:
            return batches
        if not holds_media(calibration.dataset):
            if report is not None:
                report.note(f"calibration: {calibration.dataset} is text only; the audio encoder and the vision tower get "
                            "no calibration batch (a config that quantizes them needs image and audio data)")
            return [{"input_ids": ids} for ids in text_batches(calibration, load_tokenizer(source), report)]
        processor = self.processor(source, program.model)
        extractor = processor.feature_extractor
        _check_duration(calibration.audio_seconds, extractor, program.model.config)
        samples = load_media_samples(calibration.dataset, samples=calibration.samples, image_size=calibration.image_size,
                                     rate=extractor.sampling_rate, seconds=calibration.audio_seconds)
        groups: dict[tuple[bool, bool], list[MediaSample]] = {}
        for sample in samples:
            groups.setdefault(sample.media, []).append(sample)
        batches, notes = [], []
        # Image-bearing batches first: the first batch decides how the text stage carries the deepstack features.
        for media in sorted(groups, reverse=True):
            group = groups[media]
            if len(group) < calibration.batch_size:
                notes.append(f"{len(group)} {_media_words(media)} samples dropped (fewer than a batch)")
                continue
            rows = [self.encode(processor, sample, calibration.seq_len, program.model.config) for sample in group]
            made = batch_rows(rows, calibration, None)
            batches += made
            notes.append(f"{len(made)} batches of {_media_words(media)}")
        if not batches:
            raise DataError(f"{calibration.dataset} gave no full batch of calibration.batch_size={calibration.batch_size} "
                            "samples with the same media; add samples or lower batch_size")
        if report is not None:
            report.metrics["calibration_tokens"] = float(sum(b["input_ids"].numel() for b in batches))
            report.note(f"calibration: {calibration.dataset}, {calibration.batch_size} samples a batch: {'; '.join(notes)}; "
                        f"images {calibration.image_size}px square, audio {calibration.audio_seconds:g} s")
        return batches

    def messages(self, sample: MediaSample) -> list[dict]:
        """The user shows the image, plays the clip and asks; the assistant's answer if there is one."""
        content = [{"type": "image"}] if sample.image is not None else []
        content += [{"type": "audio"}] if sample.audio is not None else []
        chat = [{"role": "user", "content": [*content, {"type": "text", "text": sample.text}]}]
        if sample.response is not None:
            chat.append({"role": "assistant", "content": sample.response})
        return chat

    def processor(self, source: ModelSource, model: nn.Module) -> Any:
        """The checkpoint's processor; without torchvision, the multimodal frontend's composed one with the
        feature extractor added (`ComposedOmniProcessor`)."""
        vision = super().processor(source, model)
        if not isinstance(vision, ComposedProcessor):
            return vision
        try:
            extractor = AutoFeatureExtractor.from_pretrained(source.path)
        except (OSError, ValueError, ImportError) as error:
            raise ModelLoadError(f"could not load the audio feature extractor from {source.path}: "
                                 f"{str(error).splitlines()[0]}; copy the model's preprocessor_config.json or "
                                 "processor_config.json") from None
        return ComposedOmniProcessor(vision, extractor, model.config)

    def encode(self, processor: Any, sample: MediaSample, seq_len: int, config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """One sample as processor outputs, cut to `seq_len` tokens (never inside its image or audio tokens)."""
        text = processor.apply_chat_template(self.messages(sample), tokenize=False,
                                             add_generation_prompt=sample.response is None)
        media: dict[str, Any] = {}
        if sample.image is not None:
            media["images"] = [sample.image]
        if sample.audio is not None:
            media["audio"] = [sample.audio]
        row = dict(processor(text=[text], return_tensors="pt", **media))
        ids = row["input_ids"][0]
        needed = 0
        for key, token_id in (("images", config.image_token_id), ("audio", config.audio_token_id)):
            positions = torch.nonzero(ids == token_id).flatten()
            if key in media and len(positions) == 0:
                raise DataError(f"the chat template put no {key.rstrip('s')} token in the prompt; check the model's chat template")
            needed = max(needed, int(positions[-1]) + 1 if len(positions) else 0)
        if needed > seq_len:
            raise DataError(f"seq_len {seq_len} is shorter than a sample's prompt up to its last image or audio token "
                            f"({needed} tokens); raise seq_len (calibration.seq_len, or --seq-len of slimc trace), or lower "
                            "calibration.image_size or calibration.audio_seconds")
        return {k: (v[:, :seq_len] if k in SEQUENCE_KEYS else v) for k, v in row.items() if isinstance(v, torch.Tensor)}


class ComposedOmniProcessor:
    """What an omni processor returns, from the composed vision–language processor and the feature extractor.

    Audio becomes log-mel `input_features` and `feature_attention_mask` as the processors make them
    (Qwen2.5-Omni pads and cuts each clip to the extractor's window, Qwen3-Omni pads to the longest
    clip), and each audio token of the text is repeated once per audio-encoder output frame.
    """

    def __init__(self, vision: ComposedProcessor, feature_extractor: Any, config: PretrainedConfig) -> None:
        self.vision, self.feature_extractor = vision, feature_extractor
        self.tokenizer = vision.tokenizer
        self.audio_token = vision.tokenizer.convert_ids_to_tokens(config.audio_token_id)
        self.family, self.n_window = omni_family(config), config.audio_config.n_window

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.vision.apply_chat_template(messages, **kwargs)

    def __call__(self, *, text: list[str], images: list[Any] | None = None, audio: list[np.ndarray] | None = None,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        features = None
        if audio:
            padding = {"padding": "max_length"} if self.family.cuts_clips_to_window else {"padding": True, "truncation": False}
            features = self.feature_extractor(audio, sampling_rate=self.feature_extractor.sampling_rate, return_attention_mask=True,
                                              return_tensors=return_tensors, **padding)
            counts = iter([self.family.audio_tokens(int(n), self.n_window) for n in features["attention_mask"].sum(-1)])
            text = [_repeat_each(t, self.audio_token, counts) for t in text]
        if images:
            out = self.vision(text=text, images=images, return_tensors=return_tensors)
        else:
            encoded = self.tokenizer(text, return_tensors=return_tensors, padding=True)
            out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if features is not None:
            out["input_features"] = features["input_features"]
            out["feature_attention_mask"] = features["attention_mask"]
        return out


def _repeat_each(text: str, token: str, counts: Any) -> str:
    """`text` with its n-th `token` repeated next(counts) times."""
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + piece for piece in pieces[1:])


def _media_words(media: tuple[bool, bool]) -> str:
    image, audio = media
    return {(True, True): "image+audio", (True, False): "image", (False, True): "audio"}.get(media, "text")


def _check_duration(seconds: float, extractor: Any, config: PretrainedConfig) -> None:
    """Qwen2.5-Omni's processor cuts every clip to the extractor's window: a longer setting would be cut silently."""
    window = getattr(extractor, "chunk_length", None)
    if omni_family(config).cuts_clips_to_window and window is not None and seconds > window:
        raise DataError(f"calibration.audio_seconds={seconds:g} is longer than the {window} s the feature extractor "
                        f"pads and cuts clips to; set calibration.audio_seconds to {window} or less")


def _ensure_vision_start(source: ModelSource, thinker_config: PretrainedConfig) -> None:
    """Thinker configs may leave out `vision_start_token_id`, which the rope index reads: take the id of the
    tokenizer's vision-start token, else the talker config's."""
    if getattr(thinker_config, "vision_start_token_id", None) is not None:
        return
    found = None
    token = omni_family(thinker_config).vision_start_token
    try:
        tokenizer = load_tokenizer(source)
    except ModelLoadError:
        tokenizer = None
    if tokenizer is not None and token in tokenizer.get_vocab():
        found = tokenizer.convert_tokens_to_ids(token)
    if found is None:
        found = getattr(getattr(source.config, "talker_config", None), "vision_start_token_id", None)
    if found is None:
        raise ModelLoadError(f"{source.path}: the thinker config has no vision_start_token_id and none could be found "
                             "(talker config, tokenizer); add it to thinker_config in config.json")
    thinker_config.vision_start_token_id = int(found)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Every tensor of a safetensors checkpoint directory -> the file holding it."""
    path = Path(path)
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    from safetensors import safe_open

    with safe_open(path / SAFETENSORS_FILE, "pt") as f:
        return {name: path / SAFETENSORS_FILE for name in f.keys()}
