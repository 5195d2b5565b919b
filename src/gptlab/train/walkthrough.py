"""The walk-through's training loop, as the book writes it.

`train_model_simple` evaluates every `eval_freq` steps on `eval_iter` batches, prints a
sample after each epoch, and returns the loss and token histories. It is the readable
reference; `gptlab.train.loop.Trainer` is the same loop grown up.
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.evals.loss import calc_loss_batch, evaluate_model
from gptlab.infer.sampling import generate_text_simple, text_to_token_ids, token_ids_to_text


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    """Print a 50-token greedy continuation of `start_context` on one line."""
    model.eval()
    context_size = model.cfg.context_length
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(
            model, idx=encoded, max_new_tokens=50, context_size=context_size
        )
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer,
) -> tuple[list[float], list[float], list[int]]:
    """The walk-through's training loop. Returns (train_losses, val_losses, track_tokens_seen),
    one entry per evaluation: after steps 0, eval_freq, 2*eval_freq, ... (0-based)."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(
                    f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                )
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen
