"""Calibration and evaluation text: offline, reproducible, and never the same text in both.

The built-in corpus is English prose that every Python installation carries: the docstrings of a
fixed list of standard-library modules (read from their source with `ast`, so nothing is imported
and no module code runs) and the language-reference topics of `pydoc_data` (what `help("if")`
prints). Paragraphs are whitespace-normalised, stripped of reST markup, and dropped when they are
code, tables, headings, tiny or seen before. Each source belongs to exactly one split and
duplicates are dropped across both, so no paragraph is in calibration and evaluation at once.

The text depends on the Python version's standard library; `corpus_fingerprint` records which
text a run used.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import functools
import hashlib
import io
import json
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from slimc.config import HF_PREFIX
from slimc.errors import DataError
from slimc.frontends.base import BUILTIN_SPECS
from slimc.frontends.hub_data import hub_texts

# builtin:mix, builtin:eval and builtin:validation (slimc.frontends.mix) draw on several domains; the other two are one stream of text.
RECOMMENDED_SAMPLES = 128
RECOMMENDED_SEQ_LEN = 512
# Data files are read as they are used: text in blocks of READ_BYTES, tokenized in chunks of about CHUNK_CHARS
# characters until the windows are full; one line of a JSONL file (one sample) may not exceed MAX_LINE_CHARS.
READ_BYTES = 1 << 16
CHUNK_CHARS = 1 << 18
MAX_LINE_CHARS = 32 << 20

# Which source feeds which split: a fixed assignment, never a random draw.
CALIBRATION_SOURCES = (
    "argparse", "ast", "asyncio", "codecs", "concurrent", "configparser", "difflib", "email", "http",
    "importlib", "inspect", "ipaddress", "json", "logging", "multiprocessing", "optparse", "os", "pathlib",
    "pdb", "re", "shutil", "smtplib", "socket", "ssl", "statistics", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tkinter", "traceback", "turtle", "typing", "unittest", "urllib", "wsgiref",
    "xml", "xmlrpc", "zipfile",
)
EVALUATION_SOURCES = ("pydoc_data.topics",)
SPLITS = {"builtin:text": CALIBRATION_SOURCES, "builtin:text-eval": EVALUATION_SOURCES}

MIN_WORDS = 8
MIN_LETTER_FRACTION = 0.88  # below this a paragraph is code, a grammar rule or a table
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_REST_ROLE = re.compile(r":[a-z:]+:`~?([^`]*)`")
_LITERAL = re.compile(r"``([^`]*)``")


def load_corpus(spec: str, *, split: str | None = None, column: str | None = None) -> str:
    """The text of a built-in split (`builtin:text`, `builtin:text-eval`), of a .txt / .jsonl file, or of the
    `column` of the `split` of a `hf:` dataset."""
    return "".join(corpus_chunks(spec, split=split, column=column))


def corpus_chunks(spec: str, size: int = CHUNK_CHARS, *, split: str | None = None,
                  column: str | None = None) -> Iterator[str]:
    """The corpus of `spec` in consecutive chunks of about `size` characters, read from its file only as they are
    taken (a built-in split, already in memory, is one chunk). Joined, they are `load_corpus(spec)`."""
    if spec.startswith("builtin:"):
        if spec in BUILTIN_SPECS and spec not in SPLITS:
            raise DataError(f"{spec} draws on several domains, each cut into token windows of its own "
                            "(slimc.frontends.mix): it is not one text")
        if spec not in SPLITS:
            raise DataError(f"unknown built-in dataset {spec!r}; use one of {', '.join(BUILTIN_SPECS)}, a .txt/.jsonl "
                            f"path or {HF_PREFIX}<dataset>")
        yield _builtin_text(spec)
        return
    if spec.startswith(HF_PREFIX):
        yield from whole_token_chunks(paragraphs_joined(hub_texts(spec, split, column)), size)
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; give a .txt or .jsonl path, or one of {', '.join(BUILTIN_SPECS)}")
    if path.suffix == ".txt":
        pieces = text_blocks(path)
    elif path.suffix == ".jsonl":
        pieces = paragraphs_joined(jsonl_strings(path, "text", '{"text": "..."}'))
    else:
        raise DataError(f"dataset file {path} has an unsupported type; use a .txt file or a .jsonl file of {{\"text\": ...}} lines")
    blank = True
    for chunk in whole_token_chunks(pieces, size):
        blank = blank and not chunk.strip()
        yield chunk
    if blank:
        raise DataError(f"dataset file {path} holds no text; fill it or use {BUILTIN_SPECS[0]}")


def paragraphs_joined(strings: Iterator[str]) -> Iterator[str]:
    """The strings as one text with a blank line between each two, piece by piece."""
    for index, string in enumerate(strings):
        yield string if index == 0 else f"\n\n{string}"


def whole_token_chunks(pieces: Iterator[str], size: int) -> Iterator[str]:
    """Pieces of text regrouped into chunks of at least `size` characters, each cut before a run of whitespace
    (one holding a line break if there is one): byte-level BPE tokenizers split words there anyway, so the
    chunks' tokens are those of the whole text. A text shorter than `size` is one chunk."""
    buffer: list[str] = []
    length = 0
    for piece in pieces:
        buffer.append(piece)
        length += len(piece)
        if length < size:
            continue
        text = "".join(buffer)
        cut = _cut_point(text) or (length if length >= 4 * size else 0)  # no whitespace at all: cut anyway
        if cut:
            yield text[:cut]
        buffer, length = [text[cut:]], length - cut
    if length:
        yield "".join(buffer)


def _cut_point(text: str) -> int:
    """Where the last run of whitespace holding a line break (else any whitespace) starts; 0 if there is none."""
    for separator in ("\n", " "):
        end = text.rfind(separator)
        if end > 0 and (start := len(text[:end].rstrip())) > 0:
            return start
    return 0


def corpus_fingerprint(spec: str) -> str:
    """sha256 of the corpus text, so a run can record exactly which text it used."""
    return text_fingerprint(load_corpus(spec))


def text_fingerprint(text: str) -> str:
    """sha256 of already loaded corpus text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_samples(
    tokenizer,
    text: str,
    *,
    samples: int,
    seq_len: int,
    recommended: tuple[int, int] | None = (RECOMMENDED_SAMPLES, RECOMMENDED_SEQ_LEN),
) -> torch.LongTensor:
    """Consecutive, non-overlapping windows of the tokenized text: a (n, seq_len) tensor, n <= samples.

    Warns when fewer than `samples` windows fit, and when the request is below `recommended`
    (samples, seq_len), the calibration-set size below which scales get noisy; pass None to skip
    that check (evaluation sets).
    """
    return token_windows(tokenizer, [text], samples=samples, seq_len=seq_len, recommended=recommended)


def corpus_token_samples(
    tokenizer,
    spec: str,
    *,
    samples: int,
    seq_len: int,
    recommended: tuple[int, int] | None = (RECOMMENDED_SAMPLES, RECOMMENDED_SEQ_LEN),
    split: str | None = None,
    column: str | None = None,
) -> tuple[torch.LongTensor, str]:
    """`token_samples` of the corpus `spec`, reading and tokenizing it chunk by chunk only until the windows are
    full, so a large file costs what the windows need, not its size; and the sha256 of the text read."""
    digest = hashlib.sha256()

    def read() -> Iterator[str]:
        for chunk in corpus_chunks(spec, split=split, column=column):
            digest.update(chunk.encode("utf-8"))
            yield chunk

    with contextlib.closing(read()) as chunks:  # closes the file when the windows are full
        ids = token_windows(tokenizer, chunks, samples=samples, seq_len=seq_len, recommended=recommended)
    return ids, digest.hexdigest()


def token_windows(tokenizer, chunks: Iterable[str], *, samples: int, seq_len: int,
                   recommended: tuple[int, int] | None) -> torch.LongTensor:
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples and seq_len must be positive, got samples={samples}, seq_len={seq_len}")
    warn_below_recommended(samples, seq_len, recommended)
    ids: list[int] = []
    for chunk in chunks:
        # verbose=False: the text is longer than model_max_length on purpose; it is cut below.
        ids += tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= samples * seq_len:
            break
    available = len(ids) // seq_len
    if available == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; use more text or a smaller seq_len"
        )
    if available < samples:
        warnings.warn(
            f"the text gives only {available} windows of {seq_len} tokens ({len(ids)} tokens), not {samples}; "
            f"using {available}. Add text or lower samples/seq_len",
            UserWarning,
            stacklevel=3,
        )
    n = min(samples, available)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def warn_below_recommended(samples: int, seq_len: int, recommended: tuple[int, int] | None) -> None:
    """Warn when a calibration set of `samples` × `seq_len` tokens is below `recommended` (None: no check)."""
    if recommended is not None and (samples < recommended[0] or seq_len < recommended[1]):
        warnings.warn(
            f"{samples} samples × {seq_len} tokens is below the recommended {recommended[0]} × {recommended[1]} "
            "calibration set; scales may be noisy",
            UserWarning,
            stacklevel=4,
        )


def builtin_documents(spec: str) -> dict[str, list[str]]:
    """The paragraphs of a built-in split, by source (module name); the sources of one split only."""
    return _builtin_documents()[spec]


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> dict[str, dict[str, list[str]]]:
    # Cached in-process only: building takes about a second, and compile reads it twice.
    seen: set[str] = set()
    splits: dict[str, dict[str, list[str]]] = {}
    for spec, sources in SPLITS.items():
        splits[spec] = {}
        for source in sources:
            kept = []
            for paragraph in _source_paragraphs(source):
                if paragraph not in seen:
                    seen.add(paragraph)
                    kept.append(paragraph)
            splits[spec][source] = kept
    return splits


def _builtin_text(spec: str) -> str:
    text = "\n\n".join(p for paragraphs in builtin_documents(spec).values() for p in paragraphs)
    if not text:
        raise DataError(
            f"{spec} is empty: this Python installation lacks the standard-library sources it is built from; "
            "give calibration.dataset as a .txt or .jsonl file instead"
        )
    return text


def _source_paragraphs(source: str) -> Iterator[str]:
    if source == "pydoc_data.topics":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            return
        for name in sorted(topics):
            yield from paragraphs(topics[name])
        return
    for file in module_files(source):
        yield from docstring_paragraphs(file)


def module_files(name: str) -> list[Path]:
    """A stdlib module's source file, or a package's files in sorted order (tests excluded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (stdlib / f"{name}.py").is_file():
        return [stdlib / f"{name}.py"]
    if (stdlib / name).is_dir():
        files = (stdlib / name).rglob("*.py")
        return sorted(f for f in files if not _SKIP_DIRS.intersection(f.relative_to(stdlib).parts))
    return []


def docstring_paragraphs(file: Path) -> Iterator[str]:
    """The prose paragraphs of a source file's docstrings."""
    return (p for doc in docstrings(file) for p in paragraphs(doc))


def docstrings(file: Path) -> Iterator[str]:
    """Module, class and function docstrings in source order."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            yield doc


def paragraphs(text: str) -> Iterator[str]:
    """Prose paragraphs of a docstring or help topic, each on one line."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines or ">>>" in block or "::=" in block:
            continue
        if any(set(line) <= set("*=-~^+|") for line in lines):  # headings and table rules
            continue
        paragraph = _LITERAL.sub(r"\1", _REST_ROLE.sub(r"\1", " ".join(" ".join(lines).split())))
        if len(paragraph.split()) < MIN_WORDS:
            continue
        letters = sum(c.isalpha() or c == " " for c in paragraph)
        if letters / len(paragraph) >= MIN_LETTER_FRACTION:
            yield paragraph


def text_blocks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text, read in blocks of READ_BYTES, line endings made "\\n" as `Path.read_text` makes them;
    a file that is not UTF-8, or cannot be read, is a DataError saying so."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    offset = 0  # bytes of the file passed to the decoder
    try:
        with path.open("rb") as file:
            while True:
                raw = file.read(READ_BYTES)
                held = len(decoder.getstate()[0])  # bytes of a character split between blocks
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as error:
                    raise DataError(f"dataset file {path} is not UTF-8 text ({error.reason} at byte "
                                    f"{offset - held + error.start}); re-save it as UTF-8") from None
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return
    except OSError as error:
        raise DataError(f"dataset file {path} cannot be read ({error.strerror}); make it readable for this user") from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, read as they are taken; a line longer than MAX_LINE_CHARS is a
    DataError (one line of data is one sample: holding more in memory at once is a mistake)."""
    number, pending, length = 1, [], 0  # the line read so far, in pieces: joined once, when it ends
    for block in text_blocks(path):
        *ended, rest = block.split("\n")
        for piece in ended:
            _check_line(path, number, length + len(piece))
            yield number, "".join([*pending, piece])
            number, pending, length = number + 1, [], 0
        pending.append(rest)
        length += len(rest)
        _check_line(path, number, length)
    yield number, "".join(pending)


def _check_line(path: Path, number: int, length: int) -> None:
    if length > MAX_LINE_CHARS:
        raise DataError(f"{path}, line {number}: longer than {MAX_LINE_CHARS // 2**20} MiB; a line is one sample: "
                        "split it into several lines, or put long text in a .txt file")


def jsonl_records(path: Path, example: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSON-lines file; `example` shows a valid line in messages."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}); each line must be an object such as {example}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object such as {example}")
        yield number, record


def jsonl_strings(path: Path, key: str, example: str) -> Iterator[str]:
    """The string `key` of every line of a JSON-lines file."""
    for number, record in jsonl_records(path, example):
        if not isinstance(record.get(key), str):
            raise DataError(f"{path}, line {number}: expected an object with a string \"{key}\" field, e.g. {example}")
        yield record[key]
