"""A small byte-level BPE tokenizer trained in-process on the built-in text: no download, any text encodes.

Special tokens take ids 0-3 (`<pad>`, `<s>`, `</s>`, `<unk>`), matching the pad/bos/eos ids of the
tiny models in tiny_models.py.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimc.frontends.data import load_corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TRAINING_CHARS = 200_000  # enough for 512 merges-worth of statistics; trains in well under a second


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    """The trained tokenizer as JSON; cached so each test gets a fresh object without retraining."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = load_corpus("builtin:text")[:TRAINING_CHARS]
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh tokenizer with `vocab_size` entries (at least 260: 256 bytes plus the special tokens)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
