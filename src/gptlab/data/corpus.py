"""Text in, training windows out.

- `read_documents(inputs)` (from sources.py, the one reader of input text): files,
  directories and globs of .txt/.md/.jsonl/.parquet, the built-in `shakespeare`, `hf:NAME`.
- `tokenize_documents(...)`: documents joined with `<|endoftext|>`, tokenized once and
  cached as a `.npy` array (uint16 while ids fit, else uint32).
- `corpus_bpe(...)`: the tokenizer `data.tokenizer = "bpe:N"` names, a byte-level BPE
  trained on the training part of the text only, cached by (text, N).
- `GPTDatasetV1` and `create_dataloader`: the walk-through's sliding-window dataset.
- `load_prepared(dir)`: a corpus written by `gptlab prepare` (see prepare.py), its token
  shards memory-mapped and read as one array (shards.py) without loading them.
- `TokenWindowLoader`: the trainer's loader over a token array. It cuts the same windows
  as the walk-through's dataset but assembles each batch with one NumPy gather instead of
  per-sample Python, and its order is a pure function of (seed, epoch), so a resumed run
  can continue at any batch.
- `DataLoaderWindowLoader`: the same windows in the order the walk-through's torch
  DataLoaders give (drawn from the global RNG); `make_loaders(cfg, corpus)` picks the pair.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.atomic import replacing, write_text
from gptlab.config.schema import RunConfig, cache_dir, corpus_bpe_size
from gptlab.data.bpe import train_bpe
from gptlab.data.shards import is_prepared, open_split, prepared_manifest, read_manifest
from gptlab.data.sources import read_documents, shakespeare_plays  # noqa: F401 (also importable here)
from gptlab.data.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    Tokenizer,
    eot_id,
    get_tokenizer,
    token_byte_lengths,
)
from gptlab.errors import GptlabError

# --------------------------------------------------------------------------- tokens


def tokenize_documents(
    docs: list[str], tokenizer: Tokenizer, identity: dict[str, Any] | None = None
) -> np.ndarray:
    """All documents as one token array, joined by `<|endoftext|>`.

    With an `identity` (the tokenizer's `identity()`), the array is cached on disk under a
    key of the texts and the tokenizer, and later calls memory-map it instead of tokenizing.
    """
    key = None
    if identity is not None:
        h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        for d in docs:
            h.update(hashlib.sha256(d.encode()).digest())
        key = h.hexdigest()[:32]
        path = cache_dir() / "tokens" / f"{key}.npy"
        if path.exists():
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError):
                pass  # a damaged cache entry is rebuilt below
    text = ENDOFTEXT.join(docs)
    if hasattr(tokenizer, "encode_batch") and len(docs) > 1:
        # tiktoken tokenizes separate documents in parallel threads; the joins are added back.
        parts = tokenizer.encode_batch(docs)
        eot = tokenizer.encode(ENDOFTEXT)
        ids: list[int] = []
        for n, p in enumerate(parts):
            if n:
                ids.extend(eot)
            ids.extend(p)
    else:
        ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    dtype = np.uint16 if tokenizer.n_vocab <= 65536 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    if key is not None:
        # the cache is an optimisation: a read-only or full disk must not stop training
        with contextlib.suppress(OSError), replacing(path, "wb") as f:
            np.save(f, arr)
    return arr


@dataclass
class Corpus:
    """A tokenized corpus split into training and validation tokens."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any
    fingerprint: str  # identifies the text and tokenizer (a resumed run must see the same)


def load_corpus(
    source: str,
    tokenizer_name: str,
    train_ratio: float,
    tokenizer: Any = None,
    text_field: str = "text",
    split: str = "tokens",
) -> Corpus:
    """Read (any input `gptlab prepare` takes; `text_field` for .jsonl, .parquet and hf:),
    tokenize (cached) and split a corpus: by `train_ratio` of its tokens, or with
    `split="chars"` by `train_ratio` of its characters (see `split_by_chars`).

    `tokenizer_name` "bpe:N" trains a byte-level BPE of N ids on the training part of the
    text (see `corpus_bpe`) unless `tokenizer` (the one a run recorded) is given; its
    token split never starts the validation tokens inside that training text.

    A directory written by `gptlab prepare` is memory-mapped instead (its own split and
    tokenizer; `tokenizer_name`, `train_ratio` and `split` do not apply).
    """
    if is_prepared(source):
        return load_prepared(source)
    docs = read_documents(source, text_field=text_field)
    bpe_size = corpus_bpe_size(tokenizer_name)
    if tokenizer is None and bpe_size is not None:
        tokenizer = corpus_bpe(docs, bpe_size, train_ratio)
    elif tokenizer is None:
        tokenizer = get_tokenizer(
            tokenizer_name, text="".join(docs) if tokenizer_name == "char" else None
        )
    identity = tokenizer.identity()
    if split == "chars":
        return split_by_chars(docs, tokenizer, train_ratio)
    if split != "tokens":
        raise GptlabError(f"data.split must be tokens or chars; got {split!r}")
    tokens = tokenize_documents(docs, tokenizer, identity)
    split = int(train_ratio * len(tokens))
    if bpe_size is not None:
        split = max(split, _first_token_after(tokens, tokenizer, _train_chars(docs, train_ratio)))
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    h.update(np.ascontiguousarray(tokens).view(np.uint8))
    return Corpus(tokens[:split], tokens[split:], tokenizer, h.hexdigest()[:16])


def _train_chars(docs: list[str], train_ratio: float) -> str:
    """The text a `bpe:N` tokenizer is trained on: the first `train_ratio` of the characters
    of the documents joined by `<|endoftext|>` (exactly split_by_chars' training part)."""
    text = ENDOFTEXT.join(docs)
    return text[: int(train_ratio * len(text))]


def corpus_bpe(docs: list[str], vocab_size: int, train_ratio: float) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` ids trained on the training part of `docs` only
    (`_train_chars`), so the validation text never shaped the vocabulary.

    Trained once per (text, size): the tokenizer.json is cached under cache_dir()/bpe, keyed
    by a hash of both, so a second run and a resumed run get the identical tokenizer
    without training again.
    """
    text = _train_chars(docs, train_ratio)
    h = hashlib.sha256(f"bpe:{vocab_size}:min_frequency=2\n".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    path = cache_dir() / "bpe" / f"{h.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            return BPETokenizer(path.read_text(encoding="utf-8"))
        except (OSError, GptlabError):
            pass  # a damaged cache entry is trained again below
    # the documents' boundaries are training text's boundaries: no merge spans `<|endoftext|>`
    tokenizer = train_bpe(text.split(ENDOFTEXT), vocab_size)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs only time
        write_text(path, tokenizer.to_json())
    return tokenizer


def _first_token_after(tokens: np.ndarray, tokenizer: Any, text: str) -> int:
    """The index of the first token of `tokens` (the whole text's) that starts at or after
    the end of `text`, a prefix of it: where a validation split must start at the earliest
    for its tokens to hold no byte of `text`."""
    lengths = token_byte_lengths(tokenizer)
    eot = eot_id(tokenizer)
    if eot is not None:
        lengths[eot] = len(ENDOFTEXT.encode())  # it stands for its own bytes in the text
    ends = np.cumsum(lengths[np.asarray(tokens)])  # (n,) byte offset where each token ends
    # token i starts where token i - 1 ends; the first i with ends[i - 1] >= cut
    return int(np.searchsorted(ends, len(text.encode("utf-8", "surrogatepass")))) + 1


def split_by_chars(docs: list[str], tokenizer: Any, train_ratio: float) -> Corpus:
    """The walk-through's split: the text (documents joined by `<|endoftext|>`) is cut at
    `int(train_ratio * len(text))` characters and each part is tokenized on its own, as the
    walk-through builds its two datasets (a word cut in two becomes the tokens of its
    halves). Both parts are cached like any tokenized text."""
    identity = tokenizer.identity()
    text = ENDOFTEXT.join(docs)
    cut = int(train_ratio * len(text))
    train = tokenize_documents([text[:cut]], tokenizer, identity)
    val = tokenize_documents([text[cut:]], tokenizer, identity)
    h = hashlib.sha256(json.dumps({**identity, "split": "chars"}, sort_keys=True).encode())
    for part in (train, val):
        h.update(np.ascontiguousarray(part).view(np.uint8))
        h.update(b"|")
    return Corpus(train, val, tokenizer, h.hexdigest()[:16])


# --------------------------------------------------------------------------- prepared corpora


def load_prepared(directory: str | Path, manifest: dict[str, Any] | None = None) -> Corpus:
    """A Corpus over a `gptlab prepare` directory: both splits memory-mapped, the tokenizer
    the manifest records, and a fingerprint from the shard checksums."""
    from gptlab.data.tokenizer import from_identity

    manifest = manifest or read_manifest(directory)
    tokenizer = from_identity(manifest["tokenizer"])
    h = hashlib.sha256(json.dumps(manifest["tokenizer"], sort_keys=True).encode())
    for split in ("train", "val"):
        for sh in manifest["splits"][split]["shards"]:
            h.update(f"{split}:{sh['sha256']}".encode())
    train = open_split(directory, "train", manifest)
    val = open_split(directory, "val", manifest)
    return Corpus(train, val, tokenizer, h.hexdigest()[:16])


def open_corpus(
    cfg: RunConfig,
    manifest: dict[str, Any] | None = None,
    size_vocab: bool = True,
    tokenizer: Any = None,
) -> tuple[RunConfig, Corpus]:
    """The corpus `cfg.data` names, and a copy of `cfg` completed by it, validated.

    A prepared directory (its `manifest`, when the caller has read it already) fixes the
    tokenizer, recorded as data.tokenizer, and the split. With `size_vocab`, a char or
    trained vocabulary sets model.vocab_size (GPT-2's keeps the configured size, which may
    be padded); without it (weights from elsewhere) the model keeps its size. `tokenizer`,
    when given, replaces the one data.tokenizer would build (a resumed run's own).
    """
    cfg = copy.deepcopy(cfg)
    source = cfg.data.source
    manifest = manifest or prepared_manifest(source)
    if manifest is not None:
        cfg.data.tokenizer = manifest["tokenizer_name"]
        corpus = load_prepared(source, manifest)
        if len(corpus.val) <= cfg.model.context_length:
            raise GptlabError(
                f"the validation split of {source!r} has {len(corpus.val)} tokens, fewer than "
                f"one context window ({cfg.model.context_length + 1}); prepare it again with a "
                "larger --val-ratio or more text"
            )
    else:
        dc = cfg.data
        corpus = load_corpus(
            source, dc.tokenizer, dc.train_ratio, tokenizer, dc.text_field, dc.split
        )
    if size_vocab and corpus.tokenizer.identity()["type"] != "gpt2":
        cfg.model.vocab_size = corpus.tokenizer.n_vocab
    return cfg.validate(), corpus


# --------------------------------------------------------------------------- the walk-through's dataset


class GPTDatasetV1(Dataset):
    """Sliding windows over a text: input `ids[i : i+max_length]`, target shifted by one.

    Window starts are `range(0, len(ids) - max_length, stride)`, as in the walk-through.
    """

    def __init__(self, txt: str, tokenizer: Tokenizer, max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise GptlabError(
                f"max_length and stride must be positive, got {max_length} and {stride}"
            )
        ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT})
        self.token_ids = torch.tensor(ids, dtype=torch.long)
        self.max_length = max_length
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.starts[idx]
        return self.token_ids[i : i + self.max_length], self.token_ids[
            i + 1 : i + self.max_length + 1
        ]


def create_dataloader(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer: Tokenizer | None = None,
) -> DataLoader:
    """The walk-through's data loader: batches of (inputs, targets), each (batch_size, max_length).

    `tokenizer` defaults to GPT-2's BPE; a tiktoken Encoding works too.
    """
    tokenizer = tokenizer or get_tokenizer("gpt2")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
    )


create_dataloader_v1 = create_dataloader  # the walk-through's name


# --------------------------------------------------------------------------- the trainer's loader


class TokenWindowLoader:
    """Batches of windows over a 1-D token array: (inputs, targets), each (B, T) int64.

    The windows are the walk-through's (starts every `stride` tokens); an epoch visits each
    once, in an order fixed by (seed, epoch). `batch(epoch, index)` returns any batch
    directly, which is what exact resume needs; iterating yields epoch 0's batches, which
    is what `calc_loss_loader` needs for a fixed evaluation subset.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        stride: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        stride = stride or context_length
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.starts = np.arange(0, max(len(tokens) - context_length, 0), stride, dtype=np.int64)
        self._offsets = np.arange(context_length + 1, dtype=np.int64)  # (T+1,)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        n, b = len(self.starts), self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.starts)
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (epoch, perm)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.windows(sel)

    def windows(self, sel: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `sel` ((B,) indices into `starts`) as (inputs, targets), each (B, T) int64."""
        windows = self.tokens[self.starts[sel][:, None] + self._offsets]  # (B, T+1)
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)

    def __iter__(self):
        for i in range(len(self)):
            yield self.batch(0, i)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the order is a pure function of (seed, epoch), which the config holds."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DataLoaderWindowLoader(TokenWindowLoader):
    """TokenWindowLoader's windows in the order torch DataLoaders give the walk-through.

    The walk-through iterates `DataLoader(dataset, batch_size, shuffle, drop_last)`: every
    new iterator draws from torch's global RNG (the loader's base seed, and with shuffle
    the sampler's seed), and each epoch and each evaluation starts one. Dropout draws from
    the same RNG in between, so the orders depend on everything that ran before. Here a
    real DataLoader over the window indices `range(num_windows)` makes those draws, so they
    stay exactly torch's, and the windows are gathered as TokenWindowLoader gathers them.

    - `batch(epoch, index)`: the first call for a new epoch starts that epoch's iterator
      (its draws happen then, as at the top of the walk-through's epoch loop) and keeps the
      epoch's batches; epochs go forward only.
    - iterating starts a fresh iterator each time, as `calc_loss_loader` does on the
      walk-through's loaders (a fresh random order of the training windows each evaluation).
    - `state_dict()` holds the current epoch's order, which the RNG state alone cannot give
      back once the epoch is under way; with the global RNG state restored too, a resumed
      run repeats the uninterrupted one.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        stride: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        super().__init__(tokens, batch_size, context_length, stride, shuffle, drop_last=drop_last)
        self.index_loader = DataLoader(
            range(self.num_windows),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=0,
        )
        self._epoch: int | None = None
        self._batches: list[torch.Tensor] = []  # the current epoch's index batches, each (B,)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self._epoch_batches(epoch)[index].numpy())

    def order(self, epoch: int) -> np.ndarray:
        return torch.cat(self._epoch_batches(epoch)).numpy()

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        if epoch != self._epoch:
            if self._epoch is not None and epoch < self._epoch:
                raise ValueError(
                    f"epoch {epoch}'s order was drawn and left behind (the loader is at epoch "
                    f"{self._epoch}); a DataLoader order cannot be drawn again"
                )
            self._epoch, self._batches = epoch, list(self.index_loader)  # the draws happen here
        return self._batches

    def __iter__(self):
        for sel in self.index_loader:
            yield self.windows(sel.numpy())

    def state_dict(self) -> dict[str, Any]:
        """The current epoch and its order of windows ((num_batches * B,) int64)."""
        if self._epoch is None:
            return {}
        return {"epoch": self._epoch, "order": torch.cat(self._batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._epoch, self._batches = None, []
            return
        self._epoch = int(state["epoch"])
        self._batches = list(state["order"].split(self.batch_size))


def make_loaders(
    cfg: RunConfig, corpus: Corpus, world_size: int = 1
) -> tuple[TokenWindowLoader, TokenWindowLoader]:
    """The trainer's (train, val) loaders over `corpus` for a run config.

    Training windows start every `data.stride` tokens (0: every context_length), validation
    windows every context_length; validation keeps its order and its last partial batch.
    `data.order` picks the kind: "seeded" (TokenWindowLoader) or "dataloader"
    (DataLoaderWindowLoader, which follows one process's global RNG, so not under torchrun).
    """
    mc, tc, dc = cfg.model, cfg.train, cfg.data
    stride = dc.stride or mc.context_length
    if dc.order == "dataloader":
        if world_size > 1:
            raise GptlabError(
                "data.order dataloader follows one process's random stream, as the walk-through "
                "does; train it in one process, or use --data.order seeded under torchrun"
            )
        train = DataLoaderWindowLoader(
            corpus.train, tc.batch_size, mc.context_length, stride, dc.shuffle
        )
        val = DataLoaderWindowLoader(
            corpus.val, tc.batch_size, mc.context_length, shuffle=False, drop_last=False
        )
        return train, val
    train = TokenWindowLoader(
        corpus.train, tc.batch_size, mc.context_length, stride, dc.shuffle, tc.seed
    )
    val = TokenWindowLoader(
        corpus.val, tc.batch_size, mc.context_length, shuffle=False, seed=tc.seed, drop_last=False
    )
    return train, val
