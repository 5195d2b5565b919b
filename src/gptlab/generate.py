"""Text generation: the walk-through's greedy `generate_text_simple`, and `generate` with
temperature, top-k and top-p sampling from its own random generator (so sampling during
training never disturbs the training run's random state)."""

from __future__ import annotations

import torch
from torch import nn

from gptlab.tokenizer import ENDOFTEXT, Tokenizer


def text_to_token_ids(text: str, tokenizer: Tokenizer) -> torch.Tensor:
    """Encode text as a (1, T) batch of token ids."""
    return torch.tensor(tokenizer.encode(text, allowed_special={ENDOFTEXT})).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Tokenizer) -> str:
    """Decode a (1, T) batch (or a flat (T,) tensor) of token ids."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


@torch.no_grad()
def generate_text_simple(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """Greedy decoding: append the most likely next token `max_new_tokens` times.

    idx (B, T) -> (B, T + max_new_tokens). Only the last `context_size` tokens are fed back.
    """
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V)
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick next ids from last-position logits (B, V) -> (B, 1).

    temperature 0 is greedy; otherwise logits are divided by the temperature, cut to the
    `top_k` largest and/or the smallest set whose probability reaches `top_p`, and sampled.
    """
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` tokens after idx (B, T) -> (B, T + n).

    Stops early when every sequence has produced `eos_id`. `seed` (or an explicit
    `generator`) makes sampling reproducible without touching the global random state.
    """
    context_size = context_size or model.cfg.context_length
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V)
        idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            # As in the walk-through, the end token itself is not appended; sequences that
            # ended earlier in a batch are padded with it while the others go on.
            ended = idx_next == eos_id
            if bool((done | ended).all()):
                break
            idx_next = idx_next.masked_fill(done, eos_id)
            done |= ended
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
