"""Validation loss and bits per byte of a trained run, over its whole validation split.

    python benchmarks/eval_bpb.py runs/latest [--json]

Bits per byte make runs with different tokenizers comparable (GPT-2 BPE vs characters):
the summed cross-entropy of every scored target, in bits, over the UTF-8 bytes those
targets spell. The split and windows are the trainer's (non-overlapping windows of
context_length); `<|endoftext|>` counts as one byte (a document boundary, not text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def evaluate_run(run_dir: str, device: str = "cpu", batch_size: int = 16) -> dict:
    """{"val_loss", "bits_per_byte", "tokens", "bytes", "step"} for the run's latest checkpoint."""
    import torch.nn.functional as F

    from gptlab.data.corpus import TokenWindowLoader, load_corpus
    from gptlab.data.tokenizer import ENDOFTEXT
    from gptlab.evals.loss import bits_per_byte
    from gptlab.interop import checkpoint as ckpt_lib
    from gptlab.interop.runs import open_run

    run = open_run(run_dir, device)
    model, tokenizer, dev = run.model, run.tokenizer, run.device
    data = run.config.data
    meta = ckpt_lib.read_meta(run.checkpoint)
    corpus = load_corpus(data.source, data.tokenizer, data.train_ratio, tokenizer)
    T = model.cfg.context_length
    loader = TokenWindowLoader(corpus.val, batch_size, T, T, shuffle=False, drop_last=False)
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(dev))  # (B, T, V)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), y.to(dev).flatten(), reduction="sum"
            )
            total += loss.item()
            n_tokens += y.numel()
    targets = corpus.val[1 : 1 + n_tokens].tolist()  # the windows tile the split in order
    text = tokenizer.decode(targets)
    n_bytes = len(text.replace(ENDOFTEXT, "\n").encode("utf-8"))
    loss = total / n_tokens
    return {
        "val_loss": round(loss, 4),
        "perplexity": round(math.exp(loss), 2),
        "bits_per_byte": round(bits_per_byte(loss, n_tokens, n_bytes), 4),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "step": meta.get("step"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = evaluate_run(args.run_dir, args.device)
    if args.json:
        print(json.dumps({"run": args.run_dir, **r}))
    else:
        print(
            f"{args.run_dir}: val loss {r['val_loss']:.4f} nats/token over {r['tokens']:,} tokens "
            f"({r['bytes']:,} bytes), {r['bits_per_byte']:.4f} bits per byte"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
