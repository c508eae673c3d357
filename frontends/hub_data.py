"""Text from a Hugging Face `datasets` dataset: `dataset: hf:<name or path>`, with `split` and `column`.

What `datasets` reads without a network: a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`, a local data file (.json, .jsonl, .parquet, .csv, .txt), a local folder of
data files, or a Hub name already in the local cache (with HF_HUB_OFFLINE=1 set, so that `datasets` does
not try the network first). Rows are read in order, and only as many as the windows need.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from slimc.config import HF_PREFIX
from slimc.environment import require_extra
from slimc.errors import DataError

DEFAULT_SPLIT = "train"
DEFAULT_COLUMN = "text"
# `datasets` builders for single data files, by suffix.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def hub_texts(spec: str, split: str | None = None, column: str | None = None) -> Iterator[str]:
    """The strings of `column` (default "text") of the `split` (default "train") of the dataset `hf:<name or path>`,
    row by row; a missing split or column, or a value that is not a string, is a DataError naming what there is."""
    dataset = _split(spec, split)
    column = column or DEFAULT_COLUMN
    if column not in dataset.column_names:
        raise DataError(f"{spec} has no column {column!r}; its columns are {', '.join(dataset.column_names)}: "
                        "set calibration.column (evaluation.column) to the one holding the text")
    for row, value in enumerate(dataset.select_columns([column])):
        text = value[column]
        if not isinstance(text, str):
            raise DataError(f"{spec}, row {row}: column {column!r} holds {type(text).__name__}, not text; "
                            "name a column of strings")
        yield text


def _split(spec: str, split: str | None):
    require_extra("datasets", f"the calibration dataset {spec}")
    import datasets

    name = spec[len(HF_PREFIX):]
    if not name:
        raise DataError(f"{spec!r} names no dataset; write {HF_PREFIX}<name on the Hub or local path>")
    path = Path(name).expanduser()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk's folders
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            if path.suffix not in FILE_BUILDERS:
                raise DataError(f"{spec}: a {path.suffix or 'suffix-less'} file is not a data file `datasets` reads; "
                                f"use one of {', '.join(FILE_BUILDERS)}, or a folder written by save_to_disk")
            loaded = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path))
        else:
            loaded = datasets.load_dataset(str(path) if path.exists() else name)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise DataError(f"could not load {spec}: {error}. Offline, give a local path (a save_to_disk folder or a data "
                        "file), or a Hub name already cached with HF_HUB_OFFLINE=1 set") from None
    if isinstance(loaded, datasets.Dataset):  # saved whole: it has no splits to choose from
        if split not in (None, DEFAULT_SPLIT):
            raise DataError(f"{spec} was saved as one dataset without splits; remove split: {split}")
        return loaded
    split = split or DEFAULT_SPLIT
    if split not in loaded:
        raise DataError(f"{spec} has no split {split!r}; its splits are {', '.join(loaded)}: set split to one of them")
    return loaded[split]
