"""Calibration text from a Hugging Face `datasets` dataset (`dataset: hf:<name or path>`, `split`, `column`),
read offline from datasets the tests build and save."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_tokenizer import tiny_tokenizer

from slimc.config import CalibrationConfig, ConfigError, load_config
from slimc.errors import DataError
from slimc.frontends.data import load_corpus
from slimc.frontends.llm import text_batches

TRAIN = [f"Paragraph {i} of the training split says something about sailing ships and tides." for i in range(40)]
VALIDATION = ["The validation split holds other sentences.", "A second one, about lighthouses."]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict of two splits written by save_to_disk."""
    path = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": TRAIN, "label": list(range(len(TRAIN)))}),
        "validation": datasets.Dataset.from_dict({"text": VALIDATION, "label": [0, 1]}),
    }).save_to_disk(str(path))
    return path


def test_a_saved_dataset_gives_the_column_of_the_split_row_by_row(saved):
    assert load_corpus(f"hf:{saved}") == "\n\n".join(TRAIN)  # split train and column text by default
    assert load_corpus(f"hf:{saved}", split="validation", column="text") == "\n\n".join(VALIDATION)


def test_a_dataset_saved_without_splits_is_read_whole(tmp_path):
    datasets.Dataset.from_dict({"body": VALIDATION}).save_to_disk(str(tmp_path / "one"))
    assert load_corpus(f"hf:{tmp_path / 'one'}", column="body") == "\n\n".join(VALIDATION)
    with pytest.raises(DataError, match="saved as one dataset without splits; remove split: validation"):
        load_corpus(f"hf:{tmp_path / 'one'}", split="validation", column="body")


def test_a_local_jsonl_and_a_parquet_file_are_read(tmp_path):
    dataset = datasets.Dataset.from_dict({"text": VALIDATION})
    dataset.to_json(str(tmp_path / "rows.jsonl"))
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    assert load_corpus(f"hf:{tmp_path / 'rows.jsonl'}") == "\n\n".join(VALIDATION)
    assert load_corpus(f"hf:{tmp_path / 'rows.parquet'}") == "\n\n".join(VALIDATION)


def test_a_missing_column_is_an_error_listing_the_columns(saved):
    with pytest.raises(DataError, match="has no column 'content'; its columns are text, label"):
        load_corpus(f"hf:{saved}", column="content")


def test_a_missing_split_is_an_error_listing_the_splits(saved):
    with pytest.raises(DataError, match="has no split 'test'; its splits are train, validation"):
        load_corpus(f"hf:{saved}", split="test")


def test_a_column_that_is_not_text_is_an_error_naming_the_row(saved):
    with pytest.raises(DataError, match="row 0: column 'label' holds int, not text"):
        load_corpus(f"hf:{saved}", column="label")


def test_a_missing_dataset_is_an_error_saying_what_works_offline(tmp_path):
    with pytest.raises(DataError, match="could not load hf:.*Offline, give a local path"):
        load_corpus(f"hf:{tmp_path / 'nowhere'}")


def test_calibration_batches_are_windows_of_the_datasets_text(saved):
    calibration = CalibrationConfig(dataset=f"hf:{saved}", split="train", column="text", samples=3, seq_len=16,
                                    batch_size=2)
    tokenizer = tiny_tokenizer()
    with pytest.warns(UserWarning, match="below the recommended"):
        batches = text_batches(calibration, tokenizer)
    ids = tokenizer("\n\n".join(TRAIN), add_special_tokens=False)["input_ids"][: 3 * 16]
    assert torch.equal(torch.cat(batches), torch.tensor(ids).view(3, 16))


def test_the_config_takes_split_and_column_for_a_hf_dataset(tmp_path, saved):
    path = tmp_path / "c.yaml"
    path.write_text(f"calibration: {{dataset: 'hf:{saved}', split: validation, column: text}}\n")
    calibration = load_config(str(path)).calibration
    assert (calibration.dataset, calibration.split, calibration.column) == (f"hf:{saved}", "validation", "text")


def test_split_or_column_without_a_hf_dataset_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("calibration: {dataset: builtin:text, column: text}\n")
    with pytest.raises(ConfigError, match="column name a split and a text column of a Hugging Face dataset.*"
                                          "'builtin:text' is not one"):
        load_config(str(path))
