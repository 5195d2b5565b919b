"""`gptlab finetune`: a pretrained model, finetuned on records, written as a normal run.

`finetune()` opens the base model (`--init-from`), reads and renders the records
(gptlab.finetune.data), and hands them to the Trainer `gptlab train` uses: metrics, plots,
checkpoints, bit-exact resume and torchrun all come with it. A classifier gets a fresh head
of one row per label and, at the end, an "accuracy" record on every split.
`evaluate_finetuned()` is what `gptlab eval` reports for such a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config.schema import RunConfig
from gptlab.data import chat
from gptlab.data.records import detect_format, read_records
from gptlab.data.tokenizer import from_identity
from gptlab.errors import GptlabError
from gptlab.evals.loss import calc_loss_loader
from gptlab.finetune.data import FORMAT_FIELDS, FinetuneData, load_finetune_data
from gptlab.finetune.objectives import classification_accuracy, finetune_objective
from gptlab.interop.runs import Run, base_pointer, load_base_weights, lora_base_weights
from gptlab.model import lora
from gptlab.observe.metrics import MetricsLog
from gptlab.observe.trackers import check_installed
from gptlab.train.loop import Trainer
from gptlab.train.resolve import resolve
from gptlab.train.run import TrainResult, new_run_dir, open_init_source, rank0_notes, run_trainer

Notify = Callable[[dict[str, Any]], None]


def is_finetuned(cfg: RunConfig) -> bool:
    """True for a run `gptlab finetune` wrote (its format is resolved; train leaves auto)."""
    return cfg.finetune.format != "auto"


def run_template(fmt: str, name: str) -> chat.Template | None:
    """The chat template a finetune of format `fmt` trains in and saves: for chat the one
    `name` (finetune.template) names, for instructions chat.ALPACA, for a classifier none."""
    if fmt == "chat":
        return chat_template(name)
    if name:  # instructions have their prompt, a classifier none: a template would be unused
        raise GptlabError(
            f"finetune.template {name!r} is for chat records, but these are {fmt}; "
            "drop --finetune.template"
        )
    return chat.ALPACA if fmt == "instructions" else None


def chat_template(name: str) -> chat.Template:
    """The template finetune.template names: the default (empty), or a directory's."""
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
    cfg: RunConfig, tokenizer: Any, labels: list[str] | None, template: chat.Template | None = None
) -> FinetuneData:
    """The run's records, rendered for its model (chat records by `template`)."""
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
    cfg: RunConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    init_from: str | None = None,
    on_event: Notify | None = None,
    name: str = "finetune",
    **settings: Any,
) -> TrainResult:
    """What `gptlab finetune` does: finetune the model of `init_from` on the records in
    `cfg.data.source` into `out`, or with `resume` continue the run in `out`; as `train()`."""
    notify = rank0_notes(on_event)
    resolved = resolve(cfg, finetune=True, out=out, resume=resume, init_from=init_from, **settings)
    notify(resolved.record())
    cfg, model_keys = resolved.config, resolved.model_keys
    check_installed(cfg.train.trackers)  # a missing extra is said now, not after the data loads
    run_dir = new_run_dir(out, resume, name)
    fmt = cfg.finetune.format
    if fmt == "auto":
        fmt = detect_format(read_records(cfg.data.source), FORMAT_FIELDS, "--finetune.format")
    template = run_template(fmt, cfg.finetune.template)
    if cfg.finetune.lora_rank > 0 and cfg.runtime.parallel == "fsdp":
        raise GptlabError(
            "LoRA runs train with one process or --parallel ddp (their checkpoints keep only "
            "the adapters, which FSDP2 shards here do not); use --parallel ddp"
        )
    source = None
    if init_from is not None:
        cfg, source, tokenizer = _open_base(cfg, init_from, model_keys, notify, template)
    else:
        tokenizer = _run_tokenizer(run_dir)
        if template is not None:
            template = chat.load_template(run_dir) or template
    cfg, data = _open_records(cfg, tokenizer, template, notify)
    init_weights = _init_weights(cfg, source)
    source = None  # init_weights holds what is needed of it
    trainer = Trainer(
        cfg,
        finetune_objective(data, cfg.finetune),
        run_dir,
        resume=resume,
        on_event=on_event,
        init_weights=init_weights,
    )
    init_weights = None  # free the base's weights: the model holds them now
    if trainer.dist.is_main and template is not None:
        chat.save_template(run_dir, template)  # generate --chat, serve and convert to-hf read it
    return run_trainer(trainer, _final_accuracy if data.is_classifier else None)


def _open_base(
    cfg: RunConfig,
    init_from: str,
    model_keys: tuple[str, ...],
    notify: Notify,
    template: chat.Template | None,
) -> tuple[RunConfig, Run, Any]:
    """(cfg with the base's model config, the opened base, its tokenizer) for a new finetune
    of `init_from`; the chat template's turn tokens grow the vocabulary."""
    cfg, source = open_init_source(cfg, init_from, model_keys, notify)
    tokenizer = source.tokenizer
    use_lora = cfg.finetune.lora_rank > 0
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
    return cfg, source, tokenizer


def _open_records(
    cfg: RunConfig, tokenizer: Any, template: chat.Template | None, notify: Notify
) -> tuple[RunConfig, FinetuneData]:
    """(cfg completed by the data: its format, labels and a classifier's head; the data)."""
    labels = json.loads(cfg.finetune.labels) if cfg.finetune.labels else None
    notify({"event": "loading", "source": cfg.data.source, "prepared": False, "tokenizer": "base"})
    data = open_finetune_data(cfg, tokenizer, labels, template)
    fc = replace(
        cfg.finetune, format=data.format, labels=json.dumps(data.labels) if data.labels else ""
    )
    model = replace(cfg.model, num_classes=len(data.labels))
    return replace(cfg, finetune=fc, model=model).validate(), data


def _run_tokenizer(run_dir: Path):
    try:
        identity = json.loads((run_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GptlabError(
            f"{str(run_dir)!r} has no tokenizer.json; --resume needs a finetune run directory"
        ) from None
    return from_identity(identity)


def _init_weights(cfg: RunConfig, source: Run | None) -> Callable[[nn.Module], None] | None:
    """What the new model starts from: the base's weights, or for a resumed LoRA run its
    base's (the checkpoints hold only the adapters); None for another resumed run."""
    if source is not None:
        weights = source.model.state_dict()
    elif cfg.finetune.lora_rank > 0:
        weights = lora_base_weights(cfg)
    else:
        return None

    def init_weights(model: nn.Module) -> None:
        load_base_weights(model, weights)

    return init_weights


def _final_accuracy(trainer: Trainer, end: dict[str, Any]) -> dict[str, Any]:
    """The end record with a classifier's accuracy on every split, also written as the
    "accuracy" record (every rank computes it); not after a signal or non-finite steps."""
    if end["reason"] in ("SIGINT", "SIGTERM", "nonfinite"):
        return end
    data, bs, seed = trainer.objective.data, trainer.cfg.train.batch_size, trainer.cfg.train.seed
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
    return {**end, "accuracy": acc}


def evaluate_finetuned(
    run: Run, data: str | None = None, split: str = "val", batch_size: int = 8
) -> dict[str, Any]:
    """What `gptlab eval` reports for a finetuned run: the mean loss over the learned tokens
    of `split` (or all the records in `data`), the examples, and a classifier's accuracy."""
    cfg = run.config
    if split not in ("val", "train", "test"):
        raise GptlabError(f"split must be val, train or test, got {split!r}")
    labels = json.loads(cfg.finetune.labels) if cfg.finetune.labels else None
    if data:
        fc = replace(cfg.finetune, val_ratio=0.0, test_ratio=0.0, val=data, test="")
        cfg = replace(cfg, data=replace(cfg.data, source=data), finetune=fc)
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
        objective = finetune_objective(ft, cfg.finetune)
        loss = calc_loss_loader(loader, model, run.device, batch_loss=objective.batch_loss)
    what = f"{data} (all)" if data else f"{cfg.data.source} (the run's {split} split)"
    r: dict[str, Any] = {"data": what, "format": ft.format, "examples": len(examples), "loss": loss}
    if ft.is_classifier:
        r["accuracy"] = classification_accuracy(model, loader, run.device)
    return r
