"""Small byte-level BPE tokenizers trained in-process: no download, any text encodes.

`tiny_tokenizer` is trained on the built-in text; its special tokens take ids 0-3 (`<pad>`, `<s>`,
`</s>`, `<unk>`), matching the pad/bos/eos ids of the tiny models in tiny_models.py.
`train_byte_level_bpe` is the one trainer, also used by tiny_multimodal.py for its processors' tokenizers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimc.frontends.data import load_corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TRAINING_CHARS = 200_000  # enough for 512 merges-worth of statistics; trains in well under a second


def train_byte_level_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str],
                         unk_token: str | None = None, split_pattern: str | None = None) -> str:
    """A byte-level BPE trained on `texts`, as JSON: `special_tokens` at ids 0.., the 256 bytes, then merges.

    Words are the matches of `split_pattern` (a regex) or, without one, what GPT-2's byte-level rule splits."""
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    if split_pattern is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    """The trained tokenizer as JSON; cached so each test gets a fresh object without retraining."""
    text = load_corpus("builtin:text")[:TRAINING_CHARS]
    return train_byte_level_bpe(text.split("\n\n"), vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>")


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh tokenizer with `vocab_size` entries (at least 260: 256 bytes plus the special tokens)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
