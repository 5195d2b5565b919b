"""`gptlab train`, `gptlab finetune` and `gptlab config`: their flags, and argv turned into one
call of train(), finetune() or resolve() (which the other two call first), drawn by the console
view and ended by a few lines and an exit status."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from gptlab.cli.args import (
    AT_LEAST_ONE,
    command,
    config_field_args,
    config_overrides,
    field_flag,
    number,
    threads_arg,
)
from gptlab.config import fields as F
from gptlab.config import schema as C
from gptlab.recipes import presets as P


def train_parser(sub) -> None:
    t = command(
        sub,
        "train",
        cmd_train,
        usage="gptlab train [--data PATH] [--preset NAME] [--config FILE] [--out DIR] "
        "[options] [--section.field VALUE ...]",
        help="train a model (default: the `cpu` preset on Shakespeare, sized for a 10-minute CPU run)",
        description="Train a model. Every config field can be set as --section.field VALUE "
        "(listed below; e.g. --train.lr 3e-4, --model.n_layers=6). The limit flags replace the "
        "preset's limits; given together, training stops at whichever comes first. See the "
        "resolved config with `gptlab config` and the same flags.",
    )
    run_config_args(t)
    t.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<preset>-<time>; runs/latest points at the newest)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    threads_arg(t)
    t.add_argument(
        "--init-from",
        metavar="SRC",
        help="start from these weights: a gptlab run, a Hugging Face GPT-2 or Llama directory or a hub id "
        "(gpt2, gpt2-medium, ...); the model config comes from SRC (only --model.drop_rate and "
        "--model.attention may change)",
    )
    _tracker_args(t)
    config_field_args(t)


def _tracker_args(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--tracker",
        action="append",
        choices=C.TRACKERS,
        metavar="NAME",
        help="also log to this experiment tracker: tensorboard (RUN_DIR/tensorboard), wandb "
        "(WANDB_MODE=offline: a local run for `wandb sync`) or trackio (local; `trackio show`); "
        "repeat for several; kept in train.trackers, so a resume logs there too",
    )
    t.add_argument("--tensorboard", action="store_true", help="the same as --tracker tensorboard")


def finetune_parser(sub) -> None:
    t = command(
        sub,
        "finetune",
        cmd_finetune,
        usage="gptlab finetune --init-from SRC --data FILE.jsonl [--out DIR] [options] "
        "[--section.field VALUE ...]",
        help="finetune a pretrained model on instruction, chat or classification records",
        description="Finetune the model of --init-from (a gptlab run or a Hugging Face GPT-2 or "
        "Llama folder) on the records of --data, one JSON object a line: instruction/input/output "
        "(the Alpaca prompt), messages (a chat template), or text/label (a classification head). "
        "The loss counts only the response tokens (--finetune.mask). Training starts from "
        "AdamW at 5e-5 for 2 epochs in batches of 8 (the book's); every --train.* field can be "
        "set. The run is a normal gptlab run: resume it with --out DIR --resume.",
    )
    run_config_args(t)
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/finetune-<time>)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the finetune in --out from its latest checkpoint",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--init-from",
        metavar="SRC",
        help="the base model: a gptlab run or a Hugging Face GPT-2 or Llama directory (or hub id); "
        "only --model.drop_rate and --model.attention may change",
    )
    threads_arg(t)
    _tracker_args(t)
    _lora_args(t)
    config_field_args(t)


# LoRA's flags: flag -> (dotted key, metavar, bounds); --lora-rank refuses 0 ("no LoRA").
LORA_FLAGS = {
    "--lora-rank": ("finetune.lora_rank", "R", AT_LEAST_ONE),
    "--lora-alpha": ("finetune.lora_alpha", "A", F.POSITIVE),
    "--lora-targets": ("finetune.lora_targets", "attn|mlp|all|NAMES", None),
    "--lora-dropout": ("finetune.lora_dropout", "P", F.BELOW_ONE),
}


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "LoRA (low-rank adapters on the frozen base; see also --finetune.lora_*)"
    )
    for flag, (key, metavar, bounds) in LORA_FLAGS.items():
        field_flag(g, flag, key, _field(key), f"same as --{key}", metavar, bounds)


def config_parser(sub) -> None:
    c = command(
        sub,
        "config",
        cmd_config,
        usage="gptlab config [--preset NAME] [--config FILE] [--data PATH] [options] "
        "[--section.field VALUE ...]",
        help="print the resolved config of a run as TOML (what --config reads back)",
        description="Print the config `gptlab train` would run with these flags, resolved "
        "(preset, then --config, then the flags) and validated, as TOML. Save it, edit it and "
        "pass it back with --config.",
    )
    run_config_args(c)
    c.set_defaults(out=None, resume=False)
    config_field_args(c)


# Flags that each set one config field: flag -> (dotted key, metavar).
FIELD_ALIASES = {
    "--precision": ("runtime.precision", None),
    "--compile": ("runtime.compile", None),
    "--device": ("runtime.device", "DEVICE"),
    "--parallel": ("runtime.parallel", None),
    "--checkpoint-every": ("train.checkpoint_every", "STEPS"),
    "--checkpoint-every-minutes": ("train.checkpoint_every_minutes", "M"),
    "--keep-last": ("train.keep_last", "K"),
}


def run_config_args(p: argparse.ArgumentParser) -> None:
    """The flags that decide a run's config, shared by `train`, `finetune` and `config`."""
    p.add_argument(
        "--data",
        metavar="PATH",
        help="file, directory or glob of .txt/.md files, 'shakespeare' (default), "
        "or a directory written by `gptlab prepare` (streamed from disk)",
    )
    p.add_argument(
        "--preset",
        metavar="{" + ",".join(P.PRESETS) + "}",
        help=f"model/run preset (default: {P.DEFAULT_PRESET})",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with [model], [train], [data], [runtime] tables and an optional preset key "
        "(`gptlab config` writes one)",
    )
    p.add_argument(
        "--epochs",
        type=number(int, AT_LEAST_ONE),
        metavar="N",
        help="passes over the data (the schedule spans them: train.budget = steps)",
    )
    p.add_argument(
        "--max-steps",
        type=number(int, AT_LEAST_ONE),
        metavar="N",
        help="optimizer steps (the schedule spans them: train.budget = steps)",
    )
    p.add_argument(
        "--max-time",
        type=number(float, F.POSITIVE),
        metavar="SECONDS",
        help="seconds of training steps: the time budget (the default preset's schedule "
        "spans it), or a safety net beside --epochs/--max-steps",
    )
    for flag, (key, metavar) in FIELD_ALIASES.items():
        f = _field(key)
        field_flag(p, flag, key, f, f"same as --{key}", metavar, F.field_range(f))


def _field(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted config key."""
    section, name = key.split(".")
    return next(f for f in dataclasses.fields(C.SECTION_TYPES[section]) if f.name == name)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of `train`, `finetune` and `config` as resolve(), train() and finetune()
    take them."""
    trackers = list(getattr(args, "tracker", None) or [])
    if getattr(args, "tensorboard", False):
        trackers.append("tensorboard")
    return dict(
        preset=args.preset,
        config_file=args.config,
        data=args.data,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_time=args.max_time,
        overrides=config_overrides(args),
        trackers=trackers,
        out=args.out,
        resume=args.resume,
        init_from=getattr(args, "init_from", None),
        threads=getattr(args, "threads", None),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from gptlab.train.run import train

    result = _run(train, args)
    status = _report_end(
        result,
        "train",
        f"training stopped after {result.config.train.max_bad_steps} consecutive "
        "non-finite steps; the last good weights are saved; resume with a lower --train.lr "
        "(or train with --train.on_nonfinite rollback)",
    )
    if status is not None:
        return status
    start = result.config.train.start_context
    print(f'try it: gptlab generate --checkpoint {result.run_dir} --prompt "{start}"')
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from gptlab.finetune.run import finetune

    result = _run(finetune, args)
    status = _report_end(
        result, "finetune", "finetuning stopped on non-finite steps; resume with a lower --train.lr"
    )
    if status is not None:
        return status
    end = result.end
    if "accuracy" in end:
        print(
            "accuracy: "
            + " | ".join(f"{k[:-4]} {100 * v:.2f}%" for k, v in end["accuracy"].items())
        )
    print(f"evaluate it: gptlab eval --checkpoint {result.run_dir}")
    return 0


def _run(run: Callable, args: argparse.Namespace):
    """train() or finetune() with these arguments, drawn by the console view; its TrainResult.
    The sizing line is printed first (on stdout: stderr is for one-line errors), the threads note
    with the start line."""
    from gptlab.observe.console import ConsoleView

    view = ConsoleView(quiet=args.quiet)

    def on_event(r: dict[str, Any]) -> None:
        if r["event"] != "resolved":
            view(r)
            return
        if r["sizing"]:
            print(r["sizing"], flush=True)
        if r["threads_note"]:
            view.note = f"gptlab: note: {r['threads_note']}"

    try:
        return run(**run_settings(args), on_event=on_event)
    finally:
        view.close()


def cmd_config(args: argparse.Namespace) -> int:
    from gptlab.train.resolve import resolve

    resolved = resolve(**run_settings(args))  # what the sizing chose is in it (a fixed point)
    sys.stdout.write(C.to_toml(resolved.config, resolved.name))
    return 0


def _report_end(result, command: str, nonfinite: str) -> int | None:
    """Prints how the run ended (rank 0 only); the exit status when it did not end well (a signal,
    non-finite steps; other ranks exit alike, silently), None when it finished."""
    end = result.end
    if not result.is_main:  # the same exit status as rank 0, without its messages
        return {"SIGINT": 130, "SIGTERM": 143, "nonfinite": 1}.get(end["reason"], 0)
    if result.plot is not None:
        print(f"loss plot: {result.plot} (and .pdf)")
    print(f"checkpoint: {end['checkpoint']}")
    if end["reason"] in ("SIGINT", "SIGTERM"):
        print(
            f"stopped by {end['reason']} at step {end['step']}; resume with: "
            f"gptlab {command} --out {result.run_dir} --resume"
        )
        return 130 if end["reason"] == "SIGINT" else 143
    if end["reason"] == "nonfinite":
        print(f"gptlab: error: {nonfinite}", file=sys.stderr)
        return 1
    return None
