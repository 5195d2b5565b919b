"""Train a byte-level BPE of GPT-2's kind (its split pattern, pieces mapped to bytes so any
text round-trips, `<|endoftext|>` special) on the user's own text with `tokenizers`.
"""

from __future__ import annotations

from collections.abc import Iterable

from gptlab.config.schema import BPE_MIN_VOCAB
from gptlab.data.tokenizer import ENDOFTEXT, BPETokenizer
from gptlab.errors import GptlabError

# 256 byte tokens and the special token come first; the vocabulary needs room for merges.
MIN_VOCAB = BPE_MIN_VOCAB


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> BPETokenizer:
    """A BPETokenizer of at most `vocab_size` ids learned from `texts` (any iterable of
    strings, consumed once); `<|endoftext|>` is id 0 and the byte tokens follow."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise GptlabError(
            "training a tokenizer needs the `tokenizers` package: pip install tokenizers"
        ) from None
    if vocab_size < MIN_VOCAB:
        raise GptlabError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            "(256 bytes, the special token and one merge)"
        )
    if min_frequency < 1:
        raise GptlabError(f"--min-frequency must be 1 or more, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the text exactly as given (GPT-2 does the same).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        # all 256 bytes, seen in the texts or not, so no text is ever out of vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    n_texts = 0

    def counted():
        nonlocal n_texts
        for t in texts:
            n_texts += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise GptlabError("no text to train the tokenizer on; check the --data inputs")
    return BPETokenizer(tok.to_str())
