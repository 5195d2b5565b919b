"""`gptlab finetune`: a pretrained model, finetuned on records, written as a normal run.

`finetune()` opens the base model (`--init-from`: a gptlab run or a Hugging Face GPT-2 or
Llama folder), reads and renders the records (gptlab.finetune.data), and hands them to the same
Trainer `gptlab train` uses: config, metrics, plots, checkpoints, bit-exact resume and
torchrun all come with it. A classifier gets a fresh head of one row per label (the
book's chapter 6) and, at the end, its accuracy on the train, validation and test splits
(an "accuracy" record in metrics.jsonl).

`evaluate_finetuned()` is what `gptlab eval` reports for such a run: the validation loss on
the learned (response) tokens, and a classifier's accuracy.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config.schema import RunConfig
from gptlab.data import chat
from gptlab.data.tokenizer import from_identity
from gptlab.errors import GptlabError
from gptlab.evals.loss import calc_loss_loader
from gptlab.finetune.data import (
    FinetuneData,
    classification_accuracy,
    detect_format,
    load_finetune_data,
    read_records,
)
from gptlab.interop.runs import Run, base_pointer, load_base_weights, lora_base_weights
from gptlab.model import lora
from gptlab.observe.metrics import MetricsLog
from gptlab.observe.plot import plot_run
from gptlab.runtime import dist as dist_lib
from gptlab.train.loop import (
    Trainer,
    TrainResult,
    _ignore,
    _init_from,
    _new_run_dir,
    _point_latest,
    _run_with_signals,
)


def is_finetuned(cfg: RunConfig) -> bool:
    """True for a run `gptlab finetune` wrote (its format is resolved; train leaves auto)."""
    return cfg.finetune.format != "auto"


def run_template(fmt: str, name: str) -> chat.Template | None:
    """The chat template a finetune of format `fmt` trains in and saves with the run, for
    generate --chat, serve and convert to-hf: for chat records the one `name`
    (finetune.template) names, for instructions the Alpaca prompt they are rendered in
    (chat.ALPACA), for a classifier none."""
    if fmt == "chat":
        return chat_template(name)
    if name:  # instructions have their prompt, a classifier none: a template would be unused
        raise GptlabError(
            f"finetune.template {name!r} is for chat records, but these are {fmt}; "
            "drop --finetune.template"
        )
    return chat.ALPACA if fmt == "instructions" else None


def chat_template(name: str) -> chat.Template:
    """The template finetune.template names: empty or gptlab-chat (the default), or a
    directory holding a chat_template.json (a finetuned chat run's)."""
    if name in ("", chat.DEFAULT.name):
        return chat.DEFAULT
    found = chat.load_template(name) if Path(name).is_dir() else None
    if found is None:
        raise GptlabError(
            f"finetune.template {name!r} is neither {chat.DEFAULT.name!r} nor a directory with "
            f"{chat.TEMPLATE_FILE}; leave it empty for the default template"
        )
    return found


def open_finetune_data(
    cfg: RunConfig,
    tokenizer: Any,
    labels: list[str] | None,
    template: chat.Template | None = None,
) -> FinetuneData:
    """The run's records, rendered for its model (config fields as `finetune()` takes them);
    chat records by `template`."""
    render = None
    if template is not None:

        def render(messages, add_generation_prompt):
            return chat.render(template, tokenizer, messages, add_generation_prompt)

    return load_finetune_data(
        cfg.finetune,
        cfg.data.source,
        tokenizer,
        cfg.model.context_length,
        cfg.train.seed,
        chat_render=render,
        labels=labels,
    )


def finetune(
    cfg: RunConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    init_from: str | None = None,
    model_keys: tuple[str, ...] = (),
    on_event: Callable[[dict[str, Any]], None] | None = None,
    name: str = "finetune",
) -> TrainResult:
    """What `gptlab finetune` does: finetune the model of `init_from` on the records in
    `cfg.data.source` (settings in `cfg.finetune`) into `out` (default runs/NAME-TIME), or
    with `resume`, continue the run in `out`. Returns the TrainResult, as `train()` does;
    a classifier's final accuracy is the "accuracy" record of its metrics.jsonl.
    """
    notify = on_event if on_event is not None and dist_lib.detect().is_main else _ignore
    if init_from is not None and resume:
        raise GptlabError(
            "--init-from starts a new finetune from other weights and --resume continues one; "
            "use one of them"
        )
    if init_from is None and not resume:
        raise GptlabError(
            "gptlab finetune needs --init-from SRC: the gptlab run or Hugging Face folder to start from"
        )
    run_dir = _new_run_dir(out, resume, name)
    fmt = cfg.finetune.format
    if fmt == "auto":
        fmt = detect_format(read_records(cfg.data.source))
    template = run_template(fmt, cfg.finetune.template)
    source = None
    use_lora = cfg.finetune.lora_rank > 0
    if use_lora and cfg.train.parallel == "fsdp":
        raise GptlabError(
            "LoRA runs train with one process or --parallel ddp (their checkpoints keep only "
            "the adapters, which FSDP2 shards here do not); use --parallel ddp"
        )
    if init_from is not None:
        cfg, source = _init_from(cfg, init_from, model_keys, notify)
        tokenizer = source.tokenizer
        if use_lora:  # the adapters' base, named so that every later load finds it again
            fc = replace(
                cfg.finetune,
                base=base_pointer(init_from, source),
                base_sha256=lora.weights_fingerprint(source.model),
            )
            cfg = replace(cfg, finetune=fc)
        if template is not None and use_lora and chat.missing_tokens(tokenizer, template):
            raise GptlabError(
                f"the base's tokenizer lacks the chat template's tokens "
                f"{', '.join(chat.missing_tokens(tokenizer, template))}, and LoRA keeps the "
                "embedding frozen, so they would stay alike; finetune fully (no --lora-rank), "
                "or start from a base that has them (a chat finetune)"
            )
        if template is not None:  # the turn tokens: a base lacks them, its vocabulary grows
            source.model, tokenizer = chat.ensure_special_tokens(source.model, tokenizer, template)
        vocab = source.model.cfg.vocab_size  # grown, or the base's
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab, num_classes=0))
    else:
        tokenizer = _run_tokenizer(run_dir)
        if template is not None:
            template = chat.load_template(run_dir) or template
    labels = json.loads(cfg.finetune.labels) if cfg.finetune.labels else None
    notify({"event": "loading", "source": cfg.data.source, "prepared": False, "tokenizer": "base"})
    data = open_finetune_data(cfg, tokenizer, labels, template)
    fc = replace(
        cfg.finetune, format=data.format, labels=json.dumps(data.labels) if data.labels else ""
    )
    model = replace(cfg.model, num_classes=len(data.labels))
    cfg = replace(cfg, finetune=fc, model=model).validate()
    if source is not None:
        init_weights = _init_weights(source.model.state_dict())
    elif use_lora:  # a resumed LoRA run: its checkpoints hold the adapters, the base the rest
        init_weights = _init_weights(lora_base_weights(cfg))
    else:
        init_weights = None
    source = None
    trainer = Trainer(
        cfg, data, run_dir, resume=resume, on_event=on_event, init_weights=init_weights
    )
    init_weights = None
    if trainer.dist.is_main:
        _point_latest(run_dir)
        if template is not None:  # generate --chat, serve and convert to-hf read it there
            chat.save_template(run_dir, template)
    end = _run_with_signals(trainer, run_dir)
    if data.is_classifier and end["reason"] not in ("SIGINT", "SIGTERM", "nonfinite"):
        end = {**end, "accuracy": _final_accuracy(trainer, data)}
    dist_lib.shutdown()
    plot = None
    if trainer.dist.is_main:
        with contextlib.suppress(GptlabError):
            plot = plot_run(run_dir)
    return TrainResult(run_dir, end, cfg, plot, trainer.dist.is_main)


def _run_tokenizer(run_dir: Path):
    try:
        identity = json.loads((run_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GptlabError(
            f"{str(run_dir)!r} has no tokenizer.json; --resume needs a finetune run directory"
        ) from None
    return from_identity(identity)


def _init_weights(weights: dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """Load the base model's weights; a classifier keeps its own fresh head."""

    def init_weights(model: nn.Module) -> None:
        load_base_weights(model, weights)

    return init_weights


def _final_accuracy(trainer: Trainer, data: FinetuneData) -> dict[str, float]:
    """Accuracy on every split (the book's train / validation / test figures), written as
    the "accuracy" record; every rank computes it (the model may be sharded)."""
    bs, seed = trainer.cfg.train.batch_size, trainer.cfg.train.seed
    acc = {}
    with trainer.rt.autocast():
        for split in ("train", "val", "test"):
            if getattr(data, split):
                loader = data.loader(split, bs, seed)
                acc[f"{split}_acc"] = classification_accuracy(
                    trainer.train_model, loader, trainer.device
                )
    if trainer.dist.is_main:
        log = MetricsLog(trainer.run_dir / "metrics.jsonl")
        record = {"event": "accuracy", "step": trainer.state.step, **acc}
        log.write(record)
        log.close()
        trainer.on_event(record)
    return acc


def evaluate_finetuned(
    run: Run, data: str | None = None, split: str = "val", batch_size: int = 8
) -> dict[str, Any]:
    """What `gptlab eval` reports for a finetuned run: the mean loss over the learned
    tokens of `split` (val, train or test) of its records (or of the records in `data`,
    all of them), the examples counted, and a classifier's accuracy."""
    cfg = run.config
    if split not in ("val", "train", "test"):
        raise GptlabError(f"split must be val, train or test, got {split!r}")
    labels = json.loads(cfg.finetune.labels) if cfg.finetune.labels else None
    if data:
        cfg = replace(cfg, data=replace(cfg.data, source=data))
        cfg = replace(
            cfg, finetune=replace(cfg.finetune, val_ratio=0.0, test_ratio=0.0, val=data, test="")
        )
        split = "val"
    template = run.chat_template
    if cfg.finetune.format == "chat" and template is None:
        raise GptlabError(f"the chat run {str(run.checkpoint)!r} has no chat template; restore it")
    ft = open_finetune_data(cfg, run.tokenizer, labels, template)
    examples = getattr(ft, split)
    if not examples:
        raise GptlabError(f"the run's {split} split has no records; choose another --split")
    loader = ft.loader(split, batch_size, cfg.train.seed)
    model = run.model.eval()
    with torch.no_grad():
        loss = calc_loss_loader(loader, model, run.device, batch_loss=ft.loss)
    what = f"{data} (all)" if data else f"{cfg.data.source} (the run's {split} split)"
    r: dict[str, Any] = {"data": what, "format": ft.format, "examples": len(examples), "loss": loss}
    if ft.is_classifier:
        r["accuracy"] = classification_accuracy(model, loader, run.device)
    return r
