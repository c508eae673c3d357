"""Image–text data: the built-in scenes are reproducible, truthful and split, and JSONL files load as documented."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimc.errors import DataError
from slimc.frontends.media import (
    COLOURS,
    IMAGE_TEXT_SPECS,
    PLACES,
    SHAPES,
    builtin_sample,
    is_text_only,
    load_image_text,
    split_pairs,
)

_PLACE = {"at the top": "top", "on the left": "left", "on the right": "right", "at the bottom": "bottom",
          "in the centre": "centre", **{f"in the {p}": p for p in PLACES}}
_SHAPE = re.compile(rf"(small|medium|large) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(sorted(_PLACE, key=len, reverse=True))})")


def test_builtin_samples_are_the_same_on_every_call() -> None:
    first, again = builtin_sample(IMAGE_TEXT_SPECS[0], 7, 64), builtin_sample(IMAGE_TEXT_SPECS[0], 7, 64)
    assert (first.text, first.response) == (again.text, again.response)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.image.size == (64, 64) and first.image.mode == "RGB"


def test_calibration_and_evaluation_scenes_share_no_shape_colour_pair_and_no_caption() -> None:
    calibration, evaluation = (set(split_pairs(spec)) for spec in IMAGE_TEXT_SPECS)
    assert calibration and evaluation and not calibration & evaluation
    captions = [{builtin_sample(spec, i, 32).response for i in range(100)} for spec in IMAGE_TEXT_SPECS]
    assert not captions[0] & captions[1]
    for spec, pairs in zip(IMAGE_TEXT_SPECS, (calibration, evaluation)):
        for i in range(30):
            for _, colour, shape, _ in _SHAPE.findall(builtin_sample(spec, i, 32).response):
                assert (shape, colour) in pairs


@pytest.mark.parametrize("spec", IMAGE_TEXT_SPECS)
def test_captions_say_what_is_drawn_where(spec: str) -> None:
    """Each named filled shape has its colour at the centre of its named place; a plain background has its
    colour in the corners (no shape reaches a corner)."""
    size, checked = 120, 0
    for index in range(40):
        sample = builtin_sample(spec, index, size)
        pixels = np.asarray(sample.image)
        shapes = _SHAPE.findall(sample.response)
        assert shapes, sample.response
        for _, colour, shape, where in shapes:
            place = _PLACE[where]
            row = 0 if "top" in place else 2 if "bottom" in place else 1
            column = 0 if "left" in place else 2 if "right" in place else 1
            centre = pixels[int((row + 0.5) * size / 3), int((column + 0.5) * size / 3)]
            if shape != "ring":  # a ring is hollow
                assert tuple(centre) == COLOURS[colour], (sample.response, shape)
                checked += 1
        plain = re.search(r"on a plain (\w+) background", sample.response)
        if plain:
            assert tuple(pixels[0, 0]) == tuple(pixels[-1, -1]) == COLOURS[plain.group(1)]
    assert checked > 40


def test_jsonl_images_are_read_relative_to_the_file_and_resized(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (80, 40), (10, 200, 30)).save(tmp_path / "images" / "wide.png")
    Image.new("L", (30, 30), 128).save(tmp_path / "grey.jpg")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "images/wide.png", "text": "What colour?", "response": "Green."}\n\n'
                    f'{{"image": "{tmp_path / "grey.jpg"}", "text": "And this?"}}\n')
    with pytest.warns(UserWarning, match="holds 2 image–text samples, not 10"):
        samples = load_image_text(str(data), samples=10, image_size=48)
    assert [(s.text, s.response) for s in samples] == [("What colour?", "Green."), ("And this?", None)]
    assert all(s.image.size == (48, 48) and s.image.mode == "RGB" for s in samples)
    assert tuple(np.asarray(samples[0].image)[24, 24]) == (10, 200, 30)
    assert not is_text_only(str(data))
    assert load_image_text(str(data), samples=1, image_size=48)[0].text == "What colour?"


def test_text_only_specs_are_recognised(tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "only words"}\n')
    assert is_text_only("builtin:text") and is_text_only(str(text)) and is_text_only(str(tmp_path / "corpus.txt"))
    assert not is_text_only("builtin:image-text")


def test_an_unreadable_image_and_an_unknown_builtin_are_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "broken.png", "text": "hi"}\n')
    with pytest.raises(DataError, match=r"line 1: cannot read image .*broken.png"):
        load_image_text(str(data), samples=1, image_size=32)
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:images'"):
        load_image_text("builtin:images", samples=1, image_size=32)
