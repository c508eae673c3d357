"""Calibration and evaluation text: offline, deterministic, disjoint, and cut into token windows."""

import hashlib
import json
import re
import warnings

import huggingface_hub.constants
import pytest
import torch
from tiny_tokenizer import tiny_tokenizer

from slimc.errors import DataError
from slimc.frontends import data
from slimc.frontends.data import (
    BUILTIN_SPECS,
    CALIBRATION_SOURCES,
    EVALUATION_SOURCES,
    SPLITS,
    builtin_documents,
    corpus_fingerprint,
    load_corpus,
    token_samples,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def paragraphs(spec):
    return load_corpus(spec).split("\n\n")


def test_builtin_specs_are_the_calibration_and_evaluation_splits_and_the_two_mixes():
    assert BUILTIN_SPECS == ("builtin:text", "builtin:text-eval", "builtin:mix", "builtin:eval", "builtin:validation")
    assert tuple(SPLITS) == ("builtin:text", "builtin:text-eval")  # one text each; the mixes: test_mix.py
    assert all(load_corpus(spec) for spec in SPLITS)


def test_calibration_and_evaluation_share_no_source():
    assert not set(CALIBRATION_SOURCES) & set(EVALUATION_SOURCES)
    assert set(builtin_documents("builtin:text")) == set(CALIBRATION_SOURCES)
    assert set(builtin_documents("builtin:text-eval")) == set(EVALUATION_SOURCES)


def test_calibration_and_evaluation_share_no_paragraph():
    assert not set(paragraphs("builtin:text")) & set(paragraphs("builtin:text-eval"))


def test_no_paragraph_repeats_within_a_split():
    for spec in SPLITS:
        assert len(set(paragraphs(spec))) == len(paragraphs(spec))


def test_builtin_text_is_the_same_on_every_call():
    first = load_corpus("builtin:text")
    data._builtin_documents.cache_clear()  # rebuild from the sources, not the in-process cache
    assert load_corpus("builtin:text") == first


def test_builtin_text_is_prose_without_doctests_or_rest_markup():
    text = load_corpus("builtin:text") + load_corpus("builtin:text-eval")
    assert ">>>" not in text and ":class:`" not in text
    assert re.search(r"``\w[^`]*``", text) is None
    assert all(len(p.split()) >= 8 and "\n" not in p for p in paragraphs("builtin:text"))


def test_builtin_splits_are_large_enough_in_characters():
    # ~4.3 characters per SmolLM2 token: calibration ≥ 128 × 512 tokens, evaluation ≥ 40 × 512.
    assert len(load_corpus("builtin:text")) > 128 * 512 * 6
    assert len(load_corpus("builtin:text-eval")) > 40 * 512 * 6


def test_fingerprint_is_the_sha256_of_the_text_and_differs_between_splits():
    assert corpus_fingerprint("builtin:text") == hashlib.sha256(load_corpus("builtin:text").encode()).hexdigest()
    assert corpus_fingerprint("builtin:text") != corpus_fingerprint("builtin:text-eval")


def test_an_unknown_builtin_is_an_error_listing_the_builtins():
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:wiki'.*builtin:text, builtin:text-eval"):
        load_corpus("builtin:wiki")


def test_a_txt_file_is_read_whole(tmp_path):
    (tmp_path / "c.txt").write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "c.txt")) == "first line\n\nsecond paragraph\n"


def test_a_jsonl_file_gives_the_text_fields_in_order(tmp_path):
    lines = [json.dumps({"text": "alpha beta"}), "", json.dumps({"text": "gamma", "id": 3})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "c.jsonl")) == "alpha beta\n\ngamma"


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_a_bad_jsonl_line_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c.jsonl, line 2: not valid JSON"):
        load_corpus(str(tmp_path / "c.jsonl"))


def test_a_jsonl_line_without_text_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected an object with a string \"text\" field"):
        load_corpus(str(tmp_path / "c.jsonl"))


def test_an_unsupported_file_type_is_an_error(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported type; use a .txt file or a .jsonl"):
        load_corpus(str(tmp_path / "c.csv"))


def test_token_samples_are_consecutive_windows_of_the_tokenized_text(tokenizer):
    text = load_corpus("builtin:text-eval")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    samples = token_samples(tokenizer, text, samples=4, seq_len=64, recommended=None)
    assert samples.dtype == torch.long and samples.shape == (4, 64)
    assert samples.flatten().tolist() == ids[: 4 * 64]


def test_token_samples_are_deterministic(tokenizer):
    text = load_corpus("builtin:text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = token_samples(tokenizer, text, samples=8, seq_len=128)
        second = token_samples(tiny_tokenizer(), load_corpus("builtin:text"), samples=8, seq_len=128)
    assert torch.equal(first, second)


def test_too_little_text_warns_how_many_windows_there_are_and_returns_them(tokenizer):
    text = load_corpus("builtin:text")[:20_000]
    available = len(tokenizer(text, add_special_tokens=False)["input_ids"]) // 512
    with pytest.warns(UserWarning, match=f"only {available} windows of 512 tokens"):
        samples = token_samples(tokenizer, text, samples=1000, seq_len=512, recommended=None)
    assert samples.shape == (available, 512)


def test_text_shorter_than_one_window_is_an_error(tokenizer):
    with pytest.raises(DataError, match="fewer than one window of seq_len=512"):
        token_samples(tokenizer, "far too short", samples=128, seq_len=512)


def test_a_calibration_set_below_128_by_512_warns_and_continues(tokenizer):
    with pytest.warns(UserWarning, match="below the recommended 128 × 512 calibration set"):
        samples = token_samples(tokenizer, load_corpus("builtin:text"), samples=16, seq_len=512)
    assert samples.shape == (16, 512)


def test_a_short_seq_len_also_warns(tokenizer):
    with pytest.warns(UserWarning, match="128 samples × 64 tokens is below the recommended"):
        token_samples(tokenizer, load_corpus("builtin:text"), samples=128, seq_len=64)


def test_the_recommended_calibration_set_does_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = token_samples(tokenizer, load_corpus("builtin:text"), samples=128, seq_len=512)
    assert samples.shape == (128, 512)


@pytest.mark.slow
def test_with_the_smollm2_tokenizer_calibration_gives_128_by_512_and_evaluation_40_by_512(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from slimc.ir.source import default_model_path, load_tokenizer, resolve_model_source

    smollm2 = load_tokenizer(resolve_model_source(default_model_path()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration = token_samples(smollm2, load_corpus("builtin:text"), samples=128, seq_len=512)
        evaluation = token_samples(smollm2, load_corpus("builtin:text-eval"), samples=40, seq_len=512, recommended=None)
    assert calibration.shape == (128, 512) and evaluation.shape == (40, 512)
