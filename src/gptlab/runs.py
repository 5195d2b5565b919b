"""Open a trained model from wherever it lives: a gptlab run, a checkpoint, or a Hugging Face
GPT-2 or Llama (a local folder, or a hub id where the network allows).

`open_run` is what `gptlab generate`, `gptlab eval`, `train --init-from`, the tests and the
benchmarks use, so every one of them accepts the same sources and reports the same errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab import chat, hf
from gptlab import checkpoint as ckpt_lib
from gptlab.chat import ChatTemplate
from gptlab.config import RunConfig
from gptlab.errors import GptlabError
from gptlab.model import GPTModel
from gptlab.runtime import resolve_device
from gptlab.tokenizer import Tokenizer, from_identity


@dataclass
class Run:
    """A model ready to use, with the tokenizer and config it was trained with."""

    model: GPTModel  # in eval mode, on `device`
    tokenizer: Tokenizer
    config: RunConfig  # for a Hugging Face model: its model shape and default settings
    device: torch.device
    checkpoint: Path | None  # the checkpoint directory; None for a Hugging Face model
    chat_template: ChatTemplate | None = None  # a fine-tuned chat model's; None: a base model

    @property
    def tokenizer_identity(self) -> dict:
        return self.tokenizer.identity()


def is_hf_source(src: str | Path, hub: bool = False) -> bool:
    """True for a Hugging Face model folder (config.json, no gptlab checkpoint), and with
    `hub`, for a name that is no local path and so may be a hub id."""
    p = Path(src).expanduser()
    if ckpt_lib.is_run_dir(p):
        return False
    if p.is_dir():
        return (p / "config.json").is_file()
    return hub and not p.exists() and hf.looks_like_hub_id(str(src))


def open_run(src: str | Path, device: str | torch.device = "auto", hub: bool = False) -> Run:
    """The model of a gptlab run or checkpoint directory (its latest checkpoint), or of a
    Hugging Face GPT-2 or Llama folder (with GPT-2's tokenizer, or the trained BPE in its
    tokenizer.json), on `device`. With `hub`, a name
    that is no local path is downloaded as a hub id (where the network allows).

    Anything else is a GptlabError that says what the path holds and what to pass instead.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if is_hf_source(src, hub):
        model, tokenizer = hf.open_hf(src)
        return Run(model.to(dev), tokenizer, RunConfig(model=model.cfg), dev, None)
    model, cfg, meta = ckpt_lib.load_trained_model(src)
    tokenizer = from_identity(meta["tokenizer"])
    template = chat.load_template(meta["path"])
    if template is not None and chat.missing_tokens(tokenizer, template):
        raise GptlabError(
            f"the chat template of {str(src)!r} uses "
            f"{', '.join(chat.missing_tokens(tokenizer, template))}, which its tokenizer "
            "lacks; the run is inconsistent: fine-tune it again"
        )
    return Run(model.to(dev).eval(), tokenizer, cfg, dev, Path(meta["path"]), template)
