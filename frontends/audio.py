"""Audio calibration data: WAV files and a built-in set of synthesised clips with true captions.

Audio reaches an omni model's audio encoder as log-mel features of a fixed duration: every clip
is read as mono float samples, resampled to the feature extractor's rate, then clipped or padded
with silence to `calibration.audio_seconds`, so every batch gives the encoder the same number of
attention chunks (its traced layers are specialised to that count).

- WAV files are read with the standard library's `wave`: PCM 16-bit, any channel count (channels
  are averaged to mono). Another sample rate is converted by low-pass filtering (a Hann-windowed
  sinc at the new Nyquist frequency, when downsampling) followed by linear interpolation: enough
  for calibration statistics, not for listening.
- `builtin:audio-text` (calibration) and `builtin:audio-text-eval` (evaluation) are generated
  offline and identically on every machine: steady tones, chords, rising and falling sweeps,
  beeps, tremolo, two-tone alternations and band-limited noise bursts, each with a caption that describes it
  truthfully. The two sets share no clip (calibration uses even MIDI notes, evaluation odd ones).
- Placeholder tokens: an omni prompt holds one audio token per audio-encoder output frame;
  `qwen2_5_omni_audio_tokens` and `qwen3_omni_audio_tokens` compute that number as the processors
  do (`slimc.frontends.omni.OMNI_FAMILIES` says which family takes which).
- Omni samples (`load_media_samples`): an image and/or a clip with text, from `builtin:omni`
  (`-eval`: every sample one built-in scene and one built-in clip), the built-in audio or image
  sets, or a .jsonl of {"audio": path, "image": path, "text": ..., "response": ...} lines.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from slimc.errors import DataError
from slimc.frontends.data import jsonl_records
from slimc.frontends.media import IMAGE_TEXT_SPECS, builtin_sample, load_image_text, resized

BUILTIN_AUDIO_SPECS = ("builtin:audio-text", "builtin:audio-text-eval")
OMNI_SPECS = ("builtin:omni", "builtin:omni-eval")  # an image, a clip and a question about both, per sample
WAV_FIX = "convert it to 16-bit PCM WAV, e.g. `ffmpeg -i IN -c:a pcm_s16le OUT.wav`"
PEAK = 0.5  # amplitude of the synthesised clips (full scale is 1.0)
FADE_SECONDS = 0.01  # fade in/out of every synthesised sound, so no clip starts with a click
SINC_HALF_WIDTH = 32  # taps on each side of the anti-aliasing filter's centre


@dataclass(frozen=True)
class AudioClip:
    """Mono float32 samples at `rate` Hz, and what they sound like."""

    samples: np.ndarray
    rate: int
    caption: str


# --- WAV files ------------------------------------------------------------------------------------


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM 16-bit WAV file as mono float32 samples in [-1, 1), and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file {path} does not exist; fix the path (relative paths are read from the "
                        "directory of the .jsonl file naming them)")
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise DataError(f"audio file {path} is not a PCM WAV file ({error}); {WAV_FIX}") from None
    if width != 2:
        raise DataError(f"audio file {path} is {8 * width}-bit PCM; slimc reads 16-bit PCM: {WAV_FIX}")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if samples.size == 0:
        raise DataError(f"audio file {path} holds no samples; give a clip with sound in it")
    return samples.reshape(-1, channels).mean(axis=1), rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> Path:
    """Write mono float samples (clipped to [-1, 1]) as a 16-bit PCM WAV file."""
    path = Path(path)
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return path


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`samples` at `rate` Hz converted to `target` Hz: a low-pass at target/2 when downsampling, then linear
    interpolation at the new sample times."""
    if rate == target:
        return samples.astype(np.float32)
    if target < rate:
        cutoff = target / rate / 2  # in cycles per input sample
        taps = np.arange(-SINC_HALF_WIDTH, SINC_HALF_WIDTH + 1)
        kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hanning(len(taps))
        samples = np.convolve(samples, kernel / kernel.sum(), mode="same")
    count = max(1, round(len(samples) * target / rate))
    times = np.arange(count) * (rate / target)
    return np.interp(times, np.arange(len(samples)), samples).astype(np.float32)


def fit_duration(samples: np.ndarray, count: int) -> np.ndarray:
    """The first `count` samples, padded at the end with silence when the clip is shorter."""
    if len(samples) >= count:
        return samples[:count].astype(np.float32)
    return np.concatenate([samples, np.zeros(count - len(samples), dtype=np.float32)]).astype(np.float32)


def load_audio(path: str | Path, rate: int, seconds: float) -> np.ndarray:
    """A WAV file as `seconds` of mono float32 samples at `rate` Hz."""
    samples, source_rate = read_wav(path)
    return fit_duration(resample(samples, source_rate, rate), round(seconds * rate))


# --- placeholder tokens ---------------------------------------------------------------------------


def _halve(frames: int) -> int:
    """Output length of a stride-2 convolution with kernel 3 and padding 1."""
    return (frames - 1) // 2 + 1


def qwen2_5_omni_audio_tokens(frames: int, n_window: int) -> int:
    """Audio placeholder tokens for `frames` valid mel frames, the length Qwen2.5-Omni's audio encoder
    outputs: a stride-2 convolution, then average pooling by 2 (`n_window` plays no part)."""
    return (_halve(frames) - 2) // 2 + 1


def qwen3_omni_audio_tokens(frames: int, n_window: int) -> int:
    """Audio placeholder tokens for `frames` valid mel frames, the length Qwen3-Omni's audio encoder
    outputs: three stride-2 convolutions per chunk of 2·n_window frames (100 frames give 13 tokens),
    the rest likewise."""
    chunk = 2 * n_window
    rest = _halve(frames % chunk)
    return (_halve(rest) - 1) // 2 + 1 + (frames // chunk) * _halve(_halve(_halve(chunk)))


# --- the built-in sets ----------------------------------------------------------------------------

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_KINDS = ("tone", "chord", "sweep", "beeps", "tremolo", "alternation", "noise")
_COUNTS = ("two", "three", "four", "five")
_SET_SIZE = {"builtin:audio-text": 128, "builtin:audio-text-eval": 40}


def _frequency(midi: int) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _note(midi: int) -> str:
    return f"{_NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def _hz(frequency: float) -> str:
    return f"{frequency:.0f} Hz"


def _envelope(length: int, rate: int) -> np.ndarray:
    fade = min(length // 2, max(1, round(FADE_SECONDS * rate)))
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
    envelope = np.ones(length)
    envelope[:fade], envelope[length - fade:] = ramp, ramp[::-1]
    return envelope


def _sine(frequency: float | np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * t)


def _events(count: int, length: int, rate: int, make) -> np.ndarray:
    """`count` equal sounds of a third of their slot each, evenly spaced over the clip."""
    out = np.zeros(length)
    slot = length // count
    on = max(1, slot // 3)
    for k in range(count):
        start = k * slot + (slot - on) // 2
        out[start:start + on] = make(k, on) * _envelope(on, rate)
    return out


def _clip(kind: str, midi: int, variant: int, rate: int, seconds: float) -> tuple[np.ndarray, str]:
    """One synthesised clip and its caption; `variant` picks among a kind's forms."""
    length = round(seconds * rate)
    t = np.arange(length) / rate
    f = _frequency(midi)
    if kind == "tone":
        return _sine(f, t), f"A steady sine tone at {_hz(f)}, the note {_note(midi)}, held for the whole clip."
    if kind == "chord":
        third = 4 if variant % 2 == 0 else 3
        notes = (midi, midi + third, midi + 7)
        wave_ = sum(_sine(_frequency(n), t) for n in notes) / 3
        quality, root = ("major" if third == 4 else "minor"), _note(midi)[:-1]
        return wave_, (f"{'An' if root[0] in 'AEF' else 'A'} {root} {quality} chord: three sine tones at "
                       f"{', '.join(_hz(_frequency(n)) for n in notes[:2])} and {_hz(_frequency(notes[2]))} sounding together.")
    if kind == "sweep":
        low, high = f, f * 4
        start, end = (low, high) if variant % 2 == 0 else (high, low)
        phase = 2 * np.pi * (start * t + (end - start) * t**2 / (2 * seconds))  # linear frequency change
        direction = "rising" if start < end else "falling"
        return np.sin(phase), f"A sine sweep {direction} smoothly from {_hz(start)} to {_hz(end)}."
    if kind == "beeps":
        count = 2 + variant % 4
        return (_events(count, length, rate, lambda k, n: _sine(f, np.arange(n) / rate)),
                f"{_COUNTS[count - 2].capitalize()} short beeps at {_hz(f)} with silence between them.")
    if kind == "tremolo":
        rate_hz = 2 + variant % 5
        return (_sine(f, t) * (0.55 + 0.45 * np.cos(2 * np.pi * rate_hz * t)),
                f"A {_hz(f)} tone whose loudness pulses {rate_hz} times per second.")
    if kind == "alternation":
        upper = _frequency(midi + 5)
        phase = np.cumsum(np.where((t * 2).astype(int) % 2 == 0, f, upper)) / rate
        return (np.sin(2 * np.pi * phase),
                f"A two-tone signal switching between {_hz(f)} and {_hz(upper)} every half second.")
    count = 2 + variant % 4
    generator = np.random.default_rng(midi * 100 + variant)
    low, high = f, 2 * f
    return (_events(count, length, rate, lambda k, n: _band_noise(generator, n, rate, low, high)),
            f"{_COUNTS[count - 2].capitalize()} bursts of noise between {_hz(low)} and {_hz(high)}, separated by silence.")


def _band_noise(generator: np.random.Generator, length: int, rate: int, low: float, high: float) -> np.ndarray:
    """White noise keeping only the frequencies between `low` and `high` (an ideal band-pass in the FFT)."""
    spectrum = np.fft.rfft(generator.standard_normal(length))
    frequencies = np.fft.rfftfreq(length, 1 / rate)
    spectrum[(frequencies < low) | (frequencies > high)] = 0
    return np.fft.irfft(spectrum, length)


def builtin_audio_clips(spec: str, rate: int, seconds: float) -> list[AudioClip]:
    """The clips of a built-in set (`builtin:audio-text` or `builtin:audio-text-eval`), `seconds` long at `rate` Hz.

    The order is fixed, so `samples: n` always takes the same n clips; kinds take turns.
    """
    if spec not in _SET_SIZE:
        raise DataError(f"unknown built-in audio set {spec!r}; use one of {', '.join(BUILTIN_AUDIO_SPECS)}")
    if seconds <= 0 or rate <= 0:
        raise DataError(f"audio clips need a positive duration and rate, got {seconds} s at {rate} Hz")
    parity = 0 if spec == BUILTIN_AUDIO_SPECS[0] else 1
    clips = []
    for index in range(_SET_SIZE[spec]):
        kind, turn = _KINDS[index % len(_KINDS)], index // len(_KINDS)
        # C2 .. C6, every other semitone, a different note on each turn of a kind: a sweep two octaves up stays below 4.2 kHz
        midi = 36 + parity + 2 * (turn * 5 % 24)
        samples, caption = _clip(kind, midi, turn, rate, seconds)
        envelope = _envelope(len(samples), rate)
        samples = PEAK * samples * envelope / max(1e-9, float(np.abs(samples).max()))
        clips.append(AudioClip(samples.astype(np.float32), rate, caption))
    return clips


# --- omni samples: image and/or audio with text ------------------------------------------------------

AUDIO_PROMPTS = (
    "What do you hear?",
    "Describe the sound.",
    "What kind of sound is this? Answer in one sentence.",
    "Listen and describe the pitch and rhythm of the sound.",
)


@dataclass(frozen=True)
class MediaSample:
    """One omni calibration sample: an image and/or a clip (mono float32 at the feature extractor's rate,
    `audio_seconds` long), the user's text, and the assistant's answer if any."""

    image: Image.Image | None
    audio: np.ndarray | None
    text: str
    response: str | None = None

    @property
    def media(self) -> tuple[bool, bool]:
        """(has an image, has audio): samples batched together must agree on it."""
        return self.image is not None, self.audio is not None


def holds_audio(spec: str) -> bool:
    """Whether a dataset spec brings audio: the built-in audio and omni sets, or a .jsonl with `audio` fields."""
    if spec in BUILTIN_AUDIO_SPECS or spec in OMNI_SPECS:
        return True
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or path.suffix != ".jsonl" or not path.is_file():
        return False
    return any("audio" in record for _, record in _records(path))


def holds_media(spec: str) -> bool:
    """Whether a dataset spec brings images or audio (else it is text for the text path)."""
    if spec in BUILTIN_AUDIO_SPECS or spec in OMNI_SPECS or spec in IMAGE_TEXT_SPECS:
        return True
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or path.suffix != ".jsonl" or not path.is_file():
        return False
    return any("audio" in record or "image" in record for _, record in _records(path))


def load_media_samples(spec: str, *, samples: int, image_size: int, rate: int, seconds: float) -> list[MediaSample]:
    """Up to `samples` samples of a built-in set (omni, audio–text, image–text) or a .jsonl file: images
    `image_size` square, clips `seconds` long at `rate` Hz."""
    if spec in OMNI_SPECS:
        images = IMAGE_TEXT_SPECS[OMNI_SPECS.index(spec)]
        clips = builtin_audio_clips(BUILTIN_AUDIO_SPECS[OMNI_SPECS.index(spec)], rate, seconds)
        out = []
        for index, clip in enumerate(clips[:samples]):
            picture = builtin_sample(images, index, image_size)
            out.append(MediaSample(picture.image, clip.samples, f"{picture.text} Then describe the sound.",
                                   f"{picture.response} The sound: {clip.caption[0].lower()}{clip.caption[1:]}"))
        return out
    if spec in BUILTIN_AUDIO_SPECS:
        clips = builtin_audio_clips(spec, rate, seconds)
        return [MediaSample(None, clip.samples, AUDIO_PROMPTS[index % len(AUDIO_PROMPTS)], clip.caption)
                for index, clip in enumerate(clips[:samples])]
    if spec in IMAGE_TEXT_SPECS:
        return [MediaSample(s.image, None, s.text, s.response)
                for s in load_image_text(spec, samples=samples, image_size=image_size)]
    if spec.startswith("builtin:"):
        known = ", ".join((*OMNI_SPECS, *BUILTIN_AUDIO_SPECS, *IMAGE_TEXT_SPECS))
        raise DataError(f"unknown built-in dataset {spec!r}; media data is one of {known} or a .jsonl file")
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise DataError(f"dataset {path} is not a .jsonl file; give a .jsonl of {{\"audio\": \"a.wav\", \"image\": \"b.png\", "
                        f"\"text\": ...}} lines or one of {', '.join(OMNI_SPECS)}")
    return [_jsonl_sample(path, number, record, image_size, rate, seconds) for number, record in _records(path)[:samples]]


def _records(path: Path) -> list[tuple[int, dict]]:
    records = list(jsonl_records(path, '{"audio": "clip.wav", "text": "What do you hear?"}'))
    if not records:
        raise DataError(f"dataset file {path} holds no lines; add {{\"audio\": path, \"text\": ...}} lines")
    return records


def _jsonl_sample(path: Path, number: int, record: dict, image_size: int, rate: int, seconds: float) -> MediaSample:
    where = f"{path}, line {number}"
    for key in ("text", "image", "audio", "response"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string")
    if "text" not in record:
        raise DataError(f"{where}: has no \"text\" field; every line needs one, e.g. {{\"audio\": \"clip.wav\", \"text\": \"What do you hear?\"}}")
    image = audio = None
    if "image" in record:
        image_path = _beside(path, record["image"])
        try:
            with Image.open(image_path) as opened:
                image = resized(opened, image_size)
        except FileNotFoundError:
            raise DataError(f"{where}: image {image_path} does not exist (paths are relative to the .jsonl file)") from None
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{where}: cannot read image {image_path} ({error}); use a PNG or JPEG file") from None
    if "audio" in record:
        try:
            audio = load_audio(_beside(path, record["audio"]), rate, seconds)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
    return MediaSample(image, audio, record["text"], record.get("response"))


def _beside(path: Path, name: str) -> Path:
    """A path from a .jsonl line: absolute, or relative to the file's directory."""
    found = Path(name).expanduser()
    return found if found.is_absolute() else path.parent / found
