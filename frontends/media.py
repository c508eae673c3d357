"""Image–text calibration and evaluation data: offline, reproducible, and never the same samples in both.

A sample is one image and the text of a chat turn about it (plus, optionally, the answer). Sources:

- `builtin:image-text` (calibration) and `builtin:image-text-eval` (evaluation): scenes drawn here
  from a seed (shapes of named colours and sizes at named places, on plain, gradient, striped,
  checked, dotted or noisy backgrounds), each with a caption that says exactly what was drawn. Every
  (shape, colour) pair belongs to one split only, so no evaluation scene or caption can occur in
  calibration.
- a `.jsonl` file of `{"image": path, "text": ..., "response": ...}` lines (`response` optional),
  image paths relative to the file; PNG or JPEG (anything Pillow opens).

Text-only datasets (`builtin:text`, `.txt`, a `.jsonl` without `image` fields) are not read here:
`is_text_only` tells a frontend to use the text path (slimc.frontends.data). Every image is resized to one
square size, so every batch gives a vision tower the same number of patches.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from slimc.config import HF_PREFIX
from slimc.errors import DataError
from slimc.frontends.data import BUILTIN_SPECS, jsonl_records

IMAGE_TEXT_SPECS = ("builtin:image-text", "builtin:image-text-eval")
IMAGE_TEXT_EXAMPLE = '{"image": "cat.png", "text": "Describe the image."}'

COLOURS = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (240, 220, 30), "green": (44, 160, 44),
    "blue": (31, 90, 200), "purple": (128, 60, 170), "pink": (240, 130, 190), "brown": (140, 86, 45),
    "black": (15, 15, 15), "white": (250, 250, 250), "grey": (128, 128, 128), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "hexagon")
SIZES = {"small": 0.07, "medium": 0.11, "large": 0.155}  # radius as a fraction of the side; a cell is 1/3 wide
PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
_PLACE_PHRASE = {"top": "at the top", "left": "on the left", "right": "on the right", "bottom": "at the bottom",
                 "centre": "in the centre"}
PROMPTS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Describe the shapes and colours in this image in one sentence.",
    "What is drawn here, and where?",
    "Write a short caption for this image.",
    "List the objects in the image and the background they are on.",
)
EVAL_EVERY = 5  # one (shape, colour) pair in five belongs to the evaluation split


@dataclass(frozen=True)
class ImageText:
    """One calibration sample: an RGB image, the user's text after it, and the assistant's answer if any."""

    image: Image.Image
    text: str
    response: str | None = None


def is_text_only(spec: str) -> bool:
    """Whether a dataset spec holds text alone: built-in text, a .txt file, or a .jsonl without `image` fields."""
    if spec in BUILTIN_SPECS or spec.startswith(HF_PREFIX):  # a hf: dataset's text column
        return True
    if spec in IMAGE_TEXT_SPECS or spec.startswith("builtin:"):
        return False
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return not any("image" in record for _, record in jsonl_records(path, IMAGE_TEXT_EXAMPLE))
    return path.suffix == ".txt"


def load_image_text(spec: str, *, samples: int, image_size: int) -> list[ImageText]:
    """Up to `samples` image–text samples of a built-in split or a .jsonl file, images `image_size` square."""
    if spec in IMAGE_TEXT_SPECS:
        return [builtin_sample(spec, index, image_size) for index in range(samples)]
    if spec.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {spec!r}; image–text data is one of {', '.join(IMAGE_TEXT_SPECS)} "
                        "or a .jsonl file of {\"image\": path, \"text\": ...} lines")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; give a .jsonl file of {{\"image\": path, \"text\": ...}} "
                        f"lines or one of {', '.join(IMAGE_TEXT_SPECS)}")
    if path.suffix != ".jsonl":
        raise DataError(f"dataset file {path}: image–text data must be a .jsonl file of {{\"image\": path, \"text\": ...}} lines")
    records = _image_records(path)
    if len(records) < samples:
        warnings.warn(f"{path} holds {len(records)} image–text samples, not {samples}; using {len(records)}. "
                      "Add lines or lower samples", UserWarning, stacklevel=2)
    return [_jsonl_sample(path, number, record, image_size) for number, record in records[:samples]]


# ------------------------------------------------------------------------------------------ JSONL


def _image_records(path: Path) -> list[tuple[int, dict]]:
    """Every record, checked: each has a string `image` and `text` (and `response`, if given)."""
    records = list(jsonl_records(path, IMAGE_TEXT_EXAMPLE))
    if not records:
        raise DataError(f"dataset file {path} holds no lines; add {{\"image\": path, \"text\": ...}} lines")
    for number, record in records:
        for key in ("image", "text"):
            if not isinstance(record.get(key), str):
                problem = "has no" if key not in record else "has a non-string"
                raise DataError(f"{path}, line {number}: {problem} \"{key}\" field; every line of an image–text file "
                                "needs both, e.g. {\"image\": \"cat.png\", \"text\": \"Describe the image.\"}")
        if "response" in record and not isinstance(record["response"], str):
            raise DataError(f"{path}, line {number}: \"response\" must be a string (the assistant's answer)")
    return records


def _jsonl_sample(path: Path, number: int, record: dict, image_size: int) -> ImageText:
    image_path = Path(record["image"]).expanduser()
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    if not image_path.is_file():
        raise DataError(f"{path}, line {number}: image {image_path} does not exist (paths are relative to the .jsonl file)")
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}, line {number}: cannot read image {image_path} ({error}); use a PNG or JPEG file") from None
    return ImageText(resized(image, image_size), record["text"], record.get("response"))


def resized(image: Image.Image, size: int) -> Image.Image:
    """The whole image stretched to size × size (nothing is cropped away), RGB."""
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------ built-in scenes


def split_pairs(spec: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a built-in split draws; each pair is in exactly one split."""
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    evaluation = spec == IMAGE_TEXT_SPECS[1]
    return [p for k, p in enumerate(pairs) if (k % EVAL_EVERY == EVAL_EVERY - 1) == evaluation]


def builtin_sample(spec: str, index: int, image_size: int) -> ImageText:
    """Sample `index` of a built-in split: the same image and text on every machine and run."""
    rng = random.Random(f"slimc/{spec}/{index}")
    image, caption = draw_scene(rng, split_pairs(spec), image_size)
    return ImageText(image, rng.choice(PROMPTS), caption)


def draw_scene(rng: random.Random, pairs: list[tuple[str, str]], size: int) -> tuple[Image.Image, str]:
    """One to three shapes (from `pairs`) on a background, and the sentence describing them."""
    background, background_colours, background_text = _background(rng, size)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    count = rng.choice((1, 1, 2, 2, 3))
    places = rng.sample(PLACES, count)
    phrases = []
    for place in places:
        shape, colour = rng.choice([p for p in pairs if p[1] not in background_colours] or pairs)
        size_word = rng.choice(list(SIZES))
        _draw_shape(draw, shape, COLOURS[colour], _centre(place, size), SIZES[size_word] * size)
        phrases.append(f"a {size_word} {colour} {shape} {_PLACE_PHRASE.get(place, 'in the ' + place)}")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return image, f"{listed[0].upper()}{listed[1:]}, {background_text}."


def _centre(place: str, size: int) -> tuple[float, float]:
    row = 0 if "top" in place else 2 if "bottom" in place else 1
    column = 0 if "left" in place else 2 if "right" in place else 1
    return (column + 0.5) * size / 3, (row + 0.5) * size / 3


def _background(rng: random.Random, size: int) -> tuple[np.ndarray, set[str], str]:
    """An (size, size, 3) uint8 background, the colour names it uses, and the words for it."""
    first, second = rng.sample(list(COLOURS), 2)
    a, b = (np.array(COLOURS[c], dtype=np.float32) for c in (first, second))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    kind = rng.choice(("plain", "gradient", "stripes", "checkerboard", "dots", "noise"))
    if kind == "plain":
        return np.broadcast_to(a.astype(np.uint8), (size, size, 3)).copy(), {first}, f"on a plain {first} background"
    if kind == "gradient":
        direction, t = rng.choice((("left to right", x), ("top to bottom", y), ("corner to corner", (x + y) / 2)))
        pixels = a + (b - a) * t[..., None]
        return pixels.astype(np.uint8), {first, second}, f"on a gradient from {first} to {second}, {direction}"
    if kind == "stripes":
        direction, t = rng.choice((("vertical", x), ("horizontal", y), ("diagonal", (x + y) / 2)))
        band = (np.floor(t * rng.choice((6, 8, 10))) % 2).astype(bool)
        return np.where(band[..., None], b, a).astype(np.uint8), {first, second}, f"on {direction} {first} and {second} stripes"
    if kind == "checkerboard":
        cells = rng.choice((4, 6, 8))
        board = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(bool)
        return np.where(board[..., None], b, a).astype(np.uint8), {first, second}, f"on a {first} and {second} checkerboard"
    if kind == "dots":
        spacing = rng.choice((8, 10, 12))
        dots = ((x * spacing % 1 - 0.5) ** 2 + (y * spacing % 1 - 0.5) ** 2) < 0.04
        return np.where(dots[..., None], b, a).astype(np.uint8), {first, second}, f"on a {first} background with {second} dots"
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 28.0, (size, size, 1)).astype(np.float32)
    pixels = np.clip(a + noise, 0, 255)
    return pixels.astype(np.uint8), {first}, f"on a noisy {first} texture"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], centre: tuple[float, float],
                radius: float) -> None:
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    outline = (0, 0, 0) if sum(colour) > 300 else (255, 255, 255)
    width = max(1, int(radius / 10))
    if shape == "circle":
        draw.ellipse(box, fill=colour, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=colour, outline=outline, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    elif shape == "star":
        points = [(cx + r * np.sin(k * np.pi / 5), cy - r * np.cos(k * np.pi / 5))
                  for k, r in zip(range(10), [radius, radius * 0.45] * 5)]
        draw.polygon(points, fill=colour, outline=outline)
    else:
        sides, rotation = {"triangle": (3, 0), "diamond": (4, 45), "hexagon": (6, 30)}[shape]
        draw.regular_polygon((cx, cy, radius), sides, rotation=rotation, fill=colour, outline=outline)
