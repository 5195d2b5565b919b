"""Open a trained model from wherever it lives: a gptlab run, a checkpoint, or a Hugging Face
GPT-2 or Llama (a local folder, or a hub id where the network allows). Every command uses
`open_run`, so all accept the same sources and report the same errors.

A LoRA run stores only its adapters: `open_run` opens its base again (finetune.base),
checks it is the one trained on (finetune.base_sha256) and puts the adapters on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gptlab.atomic import write_text
from gptlab.config.schema import FinetuneConfig, RunConfig
from gptlab.data import chat
from gptlab.data.chat import Template
from gptlab.data.tokenizer import Tokenizer, from_identity
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop import hf
from gptlab.model import lora
from gptlab.model.gpt import GPTModel
from gptlab.runtime.device import resolve_device


@dataclass
class Run:
    """A model ready to use, with the tokenizer and config it was trained with."""

    model: GPTModel  # in eval mode, on `device`
    tokenizer: Tokenizer
    config: RunConfig  # for a Hugging Face model: its model shape and default settings
    device: torch.device
    checkpoint: Path | None  # the checkpoint directory; None for a Hugging Face model
    chat_template: Template | None = None  # a finetuned chat or instructions model's; None: a base

    @property
    def tokenizer_identity(self) -> dict:
        return self.tokenizer.identity()


def is_hf_source(src: str | Path, hub: bool = False) -> bool:
    """True for a Hugging Face model folder, and with `hub`, for a name that may be a hub id."""
    p = Path(src).expanduser()
    if ckpt_lib.is_run_dir(p):
        return False
    if p.is_dir():
        return (p / "config.json").is_file()
    return hub and not p.exists() and hf.looks_like_hub_id(str(src))


def open_run(src: str | Path, device: str | torch.device = "auto", hub: bool = False) -> Run:
    """The model of a gptlab run or checkpoint, or of a Hugging Face GPT-2 or Llama folder
    (with `hub`, also a hub id), on `device`; anything else is a GptlabError."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if is_hf_source(src, hub):
        model, tokenizer = hf.open_hf(src)
        return Run(model.to(dev), tokenizer, RunConfig(model=model.cfg), dev, None)
    model, cfg, meta = ckpt_lib.load_trained_model(src, lora_base=lora_model)
    tokenizer = from_identity(meta["tokenizer"])
    template = chat.load_template(meta["path"])
    if template is not None and chat.missing_tokens(tokenizer, template):
        raise GptlabError(
            f"the chat template of {str(src)!r} uses "
            f"{', '.join(chat.missing_tokens(tokenizer, template))}, which its tokenizer "
            "lacks; the run is inconsistent: fine-tune it again"
        )
    return Run(model.to(dev).eval(), tokenizer, cfg, dev, Path(meta["path"]), template)


def open_base(src: str | Path) -> Run:
    """The model `gptlab finetune --init-from SRC` starts from, LoRA adapters merged in."""
    run = open_run(src, device="cpu", hub=True)
    if lora.has_lora(run.model):
        lora.merge_lora(run.model)
    return run


def base_pointer(src: str | Path, run: Run) -> str:
    """Where a LoRA run finds its base: a checkpoint directory, a folder path or a hub id."""
    if run.checkpoint is not None:
        return str(run.checkpoint.resolve())
    p = Path(src).expanduser()
    return str(p.resolve()) if p.exists() else str(src)


def lora_base_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The weights of a LoRA run's base, checked to be the ones it trained on."""
    fc = cfg.finetune
    where = fc.base
    if not where or not fc.base_sha256:
        raise GptlabError(
            "this LoRA run's config names no base model (finetune.base, finetune.base_sha256); "
            "it cannot be loaded: finetune it again with --init-from"
        )
    if not Path(where).exists() and not hf.looks_like_hub_id(where):
        raise GptlabError(
            f"the base model {where!r} of this LoRA run is missing; put it back there (the "
            "adapters only make sense on it), or resume with --finetune.base PATH of a copy"
        )
    model = open_base(where).model
    found = lora.weights_fingerprint(model)
    if found != fc.base_sha256:
        raise GptlabError(
            f"the base model {where!r} is not the one this LoRA run trained on (its weights' "
            f"sha256 is {found[:12]}..., the run's {fc.base_sha256[:12]}...); restore that base, "
            "or resume with --finetune.base PATH of a copy of it"
        )
    return model.state_dict()


def load_base_weights(model: GPTModel, weights: dict[str, torch.Tensor]) -> None:
    """Load a base's weights into `model`; a classifier keeps its own fresh head."""
    if model.cfg.num_classes:
        mine = {k: v for k, v in weights.items() if not k.startswith("out_head.")}
        missing, unexpected = model.load_state_dict(mine, strict=False)
        if unexpected or any(not k.startswith("out_head.") for k in missing):
            raise GptlabError(
                "the base model's weights do not fit the classifier; use another base"
            )
    else:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise GptlabError(
                f"the base model's weights do not fit this run's model ({ckpt_lib._mismatch(e)}); "
                "use the base it was finetuned from"
            ) from None


def lora_model(cfg: RunConfig) -> GPTModel:
    """A LoRA run's model on the CPU: its base's weights with fresh adapters."""
    model = GPTModel(cfg.model)
    load_base_weights(model, lora_base_weights(cfg))
    return lora.prepare(model, cfg.finetune)


def merge_lora_run(src: str | Path, out_dir: str | Path) -> tuple[Path, int]:
    """Write the LoRA run `src` as a plain run in `out_dir`; returns (checkpoint, layers merged)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptlabError(f"{str(out)!r} is not empty; choose a new output directory")
    run = open_run(src, device="cpu")
    n = len(lora.lora_layers(run.model))
    if not n:
        raise GptlabError(
            f"{str(src)!r} is not a LoRA run (no adapters to merge); it is a plain run already"
        )
    model = lora.merge_lora(run.model).eval()
    fields = dataclasses.fields(FinetuneConfig)
    plain = {f.name: f.default for f in fields if f.name.startswith(("lora_", "base"))}
    cfg = replace(run.config, finetune=replace(run.config.finetune, **plain))
    meta_in = ckpt_lib.read_meta(run.checkpoint)
    meta = {
        "config": cfg.to_dict(),
        "tokenizer": run.tokenizer_identity,
        "val_loss": meta_in.get("val_loss"),
        "tokens_seen": meta_in.get("tokens_seen"),
        "merged_from": str(run.checkpoint.resolve()),
        "lora_base": run.config.finetune.base,
    }
    path = ckpt_lib.save_checkpoint(out, int(meta_in.get("step", 0)), model, meta)
    write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    write_text(out / "tokenizer.json", json.dumps(run.tokenizer_identity))
    if run.chat_template is not None:
        chat.save_template(out, run.chat_template)
    return path, n
