"""Audio calibration data: WAV reading, resampling, fixed durations, placeholder counts, the built-in sets,
the composed omni processor, and the errors users can hit."""

from __future__ import annotations

import json
import re
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_multimodal import (
    AUDIO_MEL_BINS,
    media_tokens,
    processor_inputs,
    save_tiny_multimodal,
    tiny_feature_extractor,
    tiny_image_processor,
    tiny_multimodal_model,
    tiny_multimodal_tokenizer,
)

from slimc.config import CalibrationConfig
from slimc.errors import DataError
from slimc.frontends.audio import (
    OMNI_SPECS,
    builtin_audio_clips,
    fit_duration,
    load_media_samples,
    read_wav,
    resample,
    write_wav,
)
from slimc.frontends.multimodal import ComposedProcessor, MultimodalLLM
from slimc.frontends.omni import ComposedOmniProcessor, omni_family
from slimc.ir.source import resolve_model_source

RATE = 16000


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_wav_files_round_trip_and_stereo_is_averaged_to_mono(tmp_path):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)
    samples, rate = read_wav(write_wav(tmp_path / "mono.wav", tone, RATE))
    assert rate == RATE and np.abs(samples - tone).max() < 1e-4
    left, right = np.round(tone * 32767).astype("<i2"), np.zeros(RATE, dtype="<i2")
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(np.stack([left, right], axis=1).tobytes())
    stereo, _ = read_wav(tmp_path / "stereo.wav")
    assert np.abs(stereo - left / 32768 / 2).max() < 1e-6


def test_resampling_keeps_a_tone_at_its_pitch_and_filters_what_the_new_rate_cannot_hold():
    rate = 44100
    t = np.arange(rate) / rate
    low = resample(np.sin(2 * np.pi * 1000 * t), rate, RATE)
    assert len(low) == RATE and abs(_peak_hz(low, RATE) - 1000) < 2
    aliased = resample(np.sin(2 * np.pi * 12000 * t), rate, RATE)  # above the new Nyquist frequency (8 kHz)
    assert np.sqrt(np.mean(aliased[200:-200] ** 2)) < 0.05  # a full-scale sine has RMS 0.71


def test_clips_are_cut_or_padded_with_silence_to_the_configured_duration():
    clip = np.ones(10, dtype=np.float32)
    assert np.array_equal(fit_duration(clip, 4), np.ones(4))
    assert np.array_equal(fit_duration(clip, 12), np.r_[np.ones(10), 0, 0])


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_audio_token_count_is_the_audio_encoder_output_length(kind):
    model = tiny_multimodal_model(kind)
    n_window = model.config.audio_config.n_window
    for frames in (60, 100, 137, 200, 250):
        features = torch.randn(1, AUDIO_MEL_BINS, frames, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            encoded = model.get_audio_features(features, feature_attention_mask=torch.ones(1, frames, dtype=torch.long))
        assert omni_family(model.config).audio_tokens(frames, n_window) == encoded.last_hidden_state.shape[0], frames


def test_builtin_audio_sets_are_reproducible_disjoint_and_captioned_truthfully():
    calibration = builtin_audio_clips("builtin:audio-text", RATE, 1.0)
    again = builtin_audio_clips("builtin:audio-text", RATE, 1.0)
    evaluation = builtin_audio_clips("builtin:audio-text-eval", RATE, 1.0)
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(calibration, again))
    assert not {c.caption for c in calibration} & {c.caption for c in evaluation}
    assert all(len(c.samples) == RATE and np.abs(c.samples).max() <= 0.5 + 1e-6 for c in calibration)
    tones = [c for c in calibration + evaluation if c.caption.startswith("A steady sine tone")]
    assert len(tones) >= 10
    for clip in tones:  # "A steady sine tone at 131 Hz, ...": the spectrum peaks there
        stated = float(re.search(r"at (\d+) Hz", clip.caption).group(1))
        assert abs(_peak_hz(clip.samples, RATE) - stated) <= 1.5


def test_omni_set_gives_every_sample_an_image_a_clip_and_text():
    samples = load_media_samples(OMNI_SPECS[0], samples=3, image_size=64, rate=RATE, seconds=0.5)
    assert len(samples) == 3 and all(s.media == (True, True) for s in samples)
    assert all(s.image.size == (64, 64) and len(s.audio) == RATE // 2 and "The sound:" in s.response for s in samples)


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_composed_omni_processor_gives_what_the_processor_gives(kind):
    tokenizer, image_processor, extractor = tiny_multimodal_tokenizer(kind), tiny_image_processor(kind), tiny_feature_extractor(kind)
    model = tiny_multimodal_model(kind)
    vision = ComposedProcessor(tokenizer, image_processor, model.config, tokenizer.chat_template, token_types=False)
    processor = ComposedOmniProcessor(vision, extractor, model.config)
    tokens = media_tokens(kind)
    start, end = tokens["vision_bos_token"], tokens["vision_eos_token"]
    text = [f"<|im_start|>user\n{start}{tokens['image_token']}{end}"
            f"{tokens['audio_bos_token']}{tokens['audio_token']}{tokens['audio_eos_token']}What is this?<|im_end|>"]
    image = Image.fromarray((np.random.default_rng(0).random((90, 90, 3)) * 255).astype(np.uint8))
    audio = [np.sin(np.arange(RATE, dtype=np.float32) / 20)]
    expected = processor_inputs(kind, tokenizer, image_processor, text, [image], extractor, audio)
    got = processor(text=text, images=[image], audio=audio)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


# --------------------------------------------------------------------------------------------- errors


def test_a_missing_audio_file_is_named_with_its_line(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"audio": "missing.wav", "text": "What do you hear?"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl, line 1: audio file .*missing.wav does not exist"):
        load_media_samples(str(tmp_path / "data.jsonl"), samples=4, image_size=64, rate=RATE, seconds=1)


def _float_wav(path, samples: np.ndarray, rate: int) -> None:
    """A 32-bit float WAV (format tag 3), which the standard library's `wave` does not read."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_a_wav_file_that_is_not_16_bit_pcm_is_refused_with_the_conversion(tmp_path):
    _float_wav(tmp_path / "float.wav", np.zeros(100), RATE)
    with pytest.raises(DataError, match="is not a PCM WAV file.*pcm_s16le"):
        read_wav(tmp_path / "float.wav")
    with wave.open(str(tmp_path / "eight.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(RATE)
        wav.writeframes(bytes(100))
    with pytest.raises(DataError, match="8-bit PCM; slimc reads 16-bit PCM"):
        read_wav(tmp_path / "eight.wav")


def test_audio_data_for_a_model_without_an_audio_encoder_is_refused(tmp_path):
    source = resolve_model_source(save_tiny_multimodal("qwen2_5_vl", tmp_path / "vl"))
    frontend = MultimodalLLM()
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    for dataset in ("builtin:audio-text", OMNI_SPECS[0]):
        with pytest.raises(DataError, match="holds audio, but Qwen2_5_VLForConditionalGeneration has no audio encoder"):
            frontend.calibration_batches(CalibrationConfig(dataset=dataset), source, program)
