"""Text in, training windows out.

- `load_corpus`: documents (read by sources.py) joined with `<|endoftext|>`, tokenized once
  and cached as a `.npy` array, and split; `load_prepared` memory-maps a `gptlab prepare`
  directory instead. `corpus_bpe` is the BPE `data.tokenizer = "bpe:N"` names.
- `GPTDatasetV1` and `create_dataloader`: the walk-through's sliding-window dataset.
- `TokenWindowLoader`: the trainer's loader. It cuts the walk-through's windows but gathers
  each batch with one NumPy index, in an order that is a pure function of (seed, epoch), so
  a resumed run can continue at any batch. `DataLoaderWindowLoader` gives the same windows in
  the walk-through's DataLoader order; `make_loaders(cfg, corpus)` picks the pair.
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
    from_identity,
    get_tokenizer,
    token_byte_lengths,
)
from gptlab.errors import GptlabError


def tokenize_documents(
    docs: list[str], tokenizer: Tokenizer, identity: dict[str, Any] | None = None
) -> np.ndarray:
    """All documents as one token array joined by `<|endoftext|>`; with an `identity` (the
    tokenizer's), cached on disk by texts and tokenizer, and memory-mapped by later calls."""
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
    if hasattr(tokenizer, "encode_batch") and len(docs) > 1:
        # tiktoken tokenizes separate documents in parallel threads; the joins are added back.
        parts = tokenizer.encode_batch(docs)
        eot = tokenizer.encode(ENDOFTEXT)
        ids: list[int] = list(parts[0])
        for p in parts[1:]:
            ids.extend(eot)
            ids.extend(p)
    else:
        ids = tokenizer.encode(ENDOFTEXT.join(docs), allowed_special={ENDOFTEXT})
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
    """Read any input `gptlab prepare` takes, tokenize (cached) and split it by `train_ratio`
    of its tokens, or with `split="chars"` of its characters (`split_by_chars`). "bpe:N"
    trains a BPE on the training text (`corpus_bpe`) unless `tokenizer` (a run's) is given;
    validation tokens then never start inside that text. A prepared directory is
    memory-mapped with its own split and tokenizer instead."""
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
    """The text a `bpe:N` tokenizer is trained on: split_by_chars' training part."""
    text = ENDOFTEXT.join(docs)
    return text[: int(train_ratio * len(text))]


def corpus_bpe(docs: list[str], vocab_size: int, train_ratio: float) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` ids trained on the training part of `docs` only, so
    the validation text never shaped the vocabulary. Cached under cache_dir()/bpe by (text,
    size), so a second or resumed run gets the identical tokenizer without training again."""
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
    """The index of the first of `tokens` (the whole text's) that starts at or after the
    end of `text`, a prefix of it: the earliest validation start that holds no byte of it."""
    lengths = token_byte_lengths(tokenizer)
    eot = eot_id(tokenizer)
    if eot is not None:
        lengths[eot] = len(ENDOFTEXT.encode())  # it stands for its own bytes in the text
    ends = np.cumsum(lengths[np.asarray(tokens)])  # (n,) byte offset where each token ends
    # token i starts where token i - 1 ends; the first i with ends[i - 1] >= cut
    return int(np.searchsorted(ends, len(text.encode("utf-8", "surrogatepass")))) + 1


def split_by_chars(docs: list[str], tokenizer: Any, train_ratio: float) -> Corpus:
    """The walk-through's split: the joined text is cut at `int(train_ratio * len(text))`
    characters and each part tokenized (and cached) on its own."""
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


def load_prepared(directory: str | Path, manifest: dict[str, Any] | None = None) -> Corpus:
    """A Corpus over a `gptlab prepare` directory: both splits memory-mapped, the tokenizer
    the manifest records, and a fingerprint from the shard checksums."""
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
    """(a validated copy of `cfg` completed by the corpus, the corpus `cfg.data` names). A
    prepared directory (`manifest`, if already read) sets data.tokenizer; with `size_vocab`,
    a char or trained vocabulary sets model.vocab_size; `tokenizer` (a resumed run's), when
    given, replaces the one data.tokenizer names."""
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


class GPTDatasetV1(Dataset):
    """Sliding windows over a text: input `ids[i : i+max_length]`, target shifted by one,
    for i in `range(0, len(ids) - max_length, stride)`."""

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
        window = self.token_ids[i : i + self.max_length + 1]
        return window[:-1], window[1:]


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
    """The walk-through's data loader: batches of (inputs, targets), each (batch_size,
    max_length). `tokenizer` defaults to GPT-2's BPE; a tiktoken Encoding works too."""
    dataset = GPTDatasetV1(txt, tokenizer or get_tokenizer("gpt2"), max_length, stride)
    return DataLoader(
        dataset, batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers
    )


create_dataloader_v1 = create_dataloader  # the walk-through's name


class TokenWindowLoader:
    """Batches of windows (starts every `stride` tokens) over a 1-D token array: (inputs,
    targets), each (B, T) int64. An epoch visits each window once, in an order fixed by
    (seed, epoch); `batch(epoch, index)` returns any batch directly (exact resume), and
    iterating yields epoch 0's (a fixed evaluation subset for `calc_loss_loader`)."""

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
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
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
            perm = np.arange(len(self.starts))
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(perm))
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
    """TokenWindowLoader's windows in the order the walk-through's torch DataLoaders give:
    each new iterator draws from torch's global RNG, between dropout's draws, so a real
    DataLoader over `range(num_windows)` makes the draws. The first `batch` call of an epoch
    starts its iterator (epochs go forward only), iterating starts a fresh one each time (as
    `calc_loss_loader` does), and `state_dict()` keeps the epoch's order mid-epoch."""

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
            range(self.num_windows), batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=0
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
    """The trainer's (train, val) loaders: training windows every `data.stride` tokens (0:
    context_length), validation windows every context_length, in order, the last partial
    batch kept. `data.order` "seeded" picks TokenWindowLoader, "dataloader" the other."""
    dc, b, t = cfg.data, cfg.train.batch_size, cfg.model.context_length
    stride = dc.stride or t
    if dc.order == "dataloader":
        if world_size > 1:
            raise GptlabError(
                "data.order dataloader follows one process's random stream, as the walk-through "
                "does; train it in one process, or use --data.order seeded under torchrun"
            )
        train = DataLoaderWindowLoader(corpus.train, b, t, stride, dc.shuffle)
        return train, DataLoaderWindowLoader(corpus.val, b, t, shuffle=False, drop_last=False)
    seed = cfg.train.seed
    train = TokenWindowLoader(corpus.train, b, t, stride, dc.shuffle, seed)
    return train, TokenWindowLoader(corpus.val, b, t, shuffle=False, seed=seed, drop_last=False)
