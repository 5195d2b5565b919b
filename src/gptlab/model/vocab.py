"""Growing a model's vocabulary: rows for new token ids in the token embedding and the
output head (a base model that learns a chat template's special tokens, gptlab.data.chat).
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel


def check_vocab_rows(model: nn.Module, n_vocab: int) -> None:
    """A GptlabError if `model` has fewer vocabulary rows than its tokenizer's `n_vocab` ids."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.vocab_size < n_vocab:
        raise GptlabError(
            f"the model has {cfg.vocab_size} vocabulary rows but its tokenizer "
            f"{n_vocab} ids; check that the tokenizer belongs to the model"
        )


@torch.no_grad()
def grow_vocab(model: GPTModel, old: int, new: int) -> None:
    """Give ids old..new-1 the mean of rows 0..old-1 in the embedding and output head, adding
    rows (padded to `vocab_multiple`) when too few. Raises `model.cfg.vocab_size` to `new` in
    place, so save `model.cfg` with the run."""
    cfg = model.cfg
    cfg.vocab_size = max(cfg.vocab_size, new)
    rows = cfg.padded_vocab_size
    emb, head = model.tok_emb.weight, model.out_head.weight
    tied = head is emb
    if rows > emb.shape[0]:
        model.tok_emb = _more_rows(model.tok_emb, rows)
        if tied:
            model.out_head.weight = model.tok_emb.weight
        else:
            model.out_head = _more_rows(model.out_head, rows)
    for i, table in enumerate(model.value_embeds or []):
        if rows > table.weight.shape[0]:
            model.value_embeds[i] = _more_rows(table, rows)
    tables = [t.weight for t in model.value_embeds or []]
    for w in [model.tok_emb.weight] + ([] if tied else [model.out_head.weight]) + tables:
        w[old:new] = w[:old].mean(dim=0)


def _more_rows(layer: nn.Embedding | nn.Linear, rows: int) -> nn.Embedding | nn.Linear:
    """A copy of `layer` with `rows` rows: the old ones, then zeros."""
    w = layer.weight
    n, d = w.shape
    grown = (
        nn.Embedding(rows, d, device=w.device, dtype=w.dtype)
        if isinstance(layer, nn.Embedding)
        else nn.Linear(d, rows, bias=False, device=w.device, dtype=w.dtype)
    )
    grown.weight.zero_()
    grown.weight[:n] = w
    grown.weight.requires_grad_(w.requires_grad)
    return grown
