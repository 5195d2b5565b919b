"""`gptlab train | finetune | config | generate | plot | prepare | tokenizer train | eval |
convert | serve`: the
only code that reads argv, prints for the user or exits.

User mistakes (GptlabError) print one line on stderr and exit with status 2. Help goes to
stdout. This module imports only the standard library, gptlab.config.schema and gptlab.errors at
the top, so `gptlab --help` and `gptlab <cmd> --help` answer without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gptlab.config import schema as C
from gptlab.errors import GptlabError

LIMIT_FLAGS = ("epochs", "max_steps", "max_time")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest:
            raise GptlabError(_unknown_argument(rest[0], args))
        if args.command is None:
            parser.print_help()  # on stdout like all help; still a usage mistake, so status 2
            return 2
        return args.func(args)
    except GptlabError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngptlab: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes (e.g. `--max-steps abc`) are one-line GptlabErrors,
    like every other user error, instead of a usage block and a bare exit. Flags are never
    abbreviated: a typo must not silently become another flag."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = message.removeprefix("argument ")
        flag, _, problem = message.partition(": ")
        if problem == "expected one argument":
            message = f"{flag} needs a value"
        raise GptlabError(f"{message}; see `{self.prog} --help`")


def _unknown_argument(arg: str, args: argparse.Namespace) -> str:
    """The one-line error for the first argument no option of the command took."""
    sub = getattr(args, "command_parser", None)
    prog = sub.prog if sub is not None else "gptlab"
    name = arg.split("=", 1)[0]
    if not name.startswith("-"):
        return f"unexpected argument {arg!r} for `{prog}`; see `{prog} --help`"
    flags = list(sub._option_string_actions) if sub is not None else ["--help", "--version"]
    close = difflib.get_close_matches(name, flags, n=1)
    section = name[2:].partition(".")[0]
    if close:
        hint = f"did you mean {close[0]}?"
    elif "." in name and section not in C.SECTIONS:
        hint = f"config sections are {', '.join(C.SECTIONS)}"
    else:
        hint = f"see `{prog} --help`"
    return f"unknown option {name!r} for `{prog}`; {hint}"


def _help_and_fail(parser: argparse.ArgumentParser) -> int:
    """A command group called without its subcommand: its help (on stdout), status 2."""
    parser.print_help()
    return 2


# --------------------------------------------------------------------------- numbers


def _number(kind: type, bounds: C.Range, note: str = "", keep_text: bool = False) -> Callable:
    """An argparse `type`: text -> kind (int or float) within bounds, else a one-line error
    naming the range. keep_text returns the text itself (a config override, converted later)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value not in bounds:
            raise argparse.ArgumentTypeError(
                f"must be {noun} {bounds.describe()}{note}, got {text!r}"
            )
        return text if keep_text else value

    return parse


AT_LEAST_ONE = C.Range(1)
SEED = C.Range(0, 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _vocab_size(text: str) -> int:
    from gptlab.data.bpe import (
        MIN_VOCAB,  # the BPE's own floor; imported only when the flag is given
    )

    return _number(int, C.Range(MIN_VOCAB), " (256 bytes, the special token, a merge)")(text)


# --------------------------------------------------------------------------- the parser


def _parser() -> argparse.ArgumentParser:
    from gptlab import __version__

    p = _Parser(prog="gptlab", description="Pretrain GPT-style language models from scratch.")
    p.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _train_parser,
        _finetune_parser,
        _config_parser,
        _generate_parser,
        _convert_parser,
        _plot_parser,
        _prepare_parser,
        _tokenizer_parser,
        _eval_parser,
        _serve_parser,
    ):
        add(sub)
    return p


def _command(sub, name: str, func: Callable, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser that runs func(args) and knows itself (for error hints)."""
    c = sub.add_parser(name, **kwargs)
    c.set_defaults(func=func, command_parser=c)
    return c


def _threads_arg(p: argparse.ArgumentParser, serve: bool = False) -> None:
    extra = "; the engine's threads and the HTTP loop never share a core" if serve else ""
    p.add_argument(
        "--threads",
        type=_number(int, C.NON_NEGATIVE),
        default=0,
        metavar="N",
        help="CPU threads for torch; 0 (default): the cores this process may use, fewer "
        f"when other programs are running now (gptlab.runtime.threads){extra}",
    )


def _apply_threads(args: argparse.Namespace, reserve: int = 0) -> str | None:
    """Set torch's threads by the policy (gptlab.runtime.threads); returns the note that says why
    it chose fewer (printed once the command is under way, so that an error stays the one
    line on stderr), or None."""
    import torch

    from gptlab.runtime.threads import choose_threads, run_threads

    resumed = run_threads(args.out) if getattr(args, "resume", False) and args.out else None
    n, note = choose_threads(args.threads or None, resumed=resumed, reserve=reserve)
    torch.set_num_threads(n)
    return f"gptlab: note: {note}" if note else None


def _print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)


def _train_parser(sub) -> None:
    t = _command(
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
    _run_config_args(t)
    t.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<preset>-<time>; runs/latest points at the newest)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads_arg(t)
    t.add_argument(
        "--init-from",
        metavar="SRC",
        help="start from these weights: a gptlab run, a Hugging Face GPT-2 or Llama directory or a hub id "
        "(gpt2, gpt2-medium, ...); the model config comes from SRC (only --model.drop_rate and "
        "--model.attention may change)",
    )
    _tracker_args(t)
    _config_field_args(t)


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
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="the same as --tracker tensorboard",
    )


def _finetune_parser(sub) -> None:
    t = _command(
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
    _run_config_args(t)
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
    _threads_arg(t)
    _tracker_args(t)
    _lora_args(t)
    _config_field_args(t)


# LoRA's flags: flag -> (dotted key, metavar, bounds); --lora-rank asks for adapters, so
# 0 (the field's "no LoRA") is refused there.
LORA_FLAGS = {
    "--lora-rank": ("finetune.lora_rank", "R", AT_LEAST_ONE),
    "--lora-alpha": ("finetune.lora_alpha", "A", C.POSITIVE),
    "--lora-targets": ("finetune.lora_targets", "attn|mlp|all|NAMES", None),
    "--lora-dropout": ("finetune.lora_dropout", "P", C.BELOW_ONE),
}


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "LoRA (low-rank adapters on the frozen base; see also --finetune.lora_*)"
    )
    fields = {f.name: f for f in dataclasses.fields(C.FinetuneConfig)}
    for flag, (key, metavar, bounds) in LORA_FLAGS.items():
        f = fields[key.split(".")[1]]
        g.add_argument(
            flag,
            action=_Override,
            key=key,
            dest=key,
            default=argparse.SUPPRESS,
            metavar=metavar,
            type=_number(type(f.default), bounds, keep_text=True) if bounds else None,
            help=_escape(f"{C.field_help(f)} (same as --{key})"),
        )


def _config_parser(sub) -> None:
    c = _command(
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
    _run_config_args(c)
    c.set_defaults(out=None, resume=False)
    _config_field_args(c)


# Flags that each set one train.* field: flag -> (dotted key, metavar).
TRAIN_ALIASES = {
    "--precision": ("train.precision", None),
    "--compile": ("train.compile", None),
    "--device": ("train.device", "DEVICE"),
    "--parallel": ("train.parallel", None),
    "--checkpoint-every": ("train.checkpoint_every", "STEPS"),
    "--checkpoint-every-minutes": ("train.checkpoint_every_minutes", "M"),
    "--keep-last": ("train.keep_last", "K"),
}


def _run_config_args(p: argparse.ArgumentParser) -> None:
    """The flags that decide a run's config, shared by `train` and `config`."""
    p.add_argument(
        "--data",
        metavar="PATH",
        help="file, directory or glob of .txt/.md files, 'shakespeare' (default), "
        "or a directory written by `gptlab prepare` (streamed from disk)",
    )
    p.add_argument(
        "--preset",
        metavar="{" + ",".join(C.PRESETS) + "}",
        help=f"model/run preset (default: {C.DEFAULT_PRESET})",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with [model], [train], [data] tables and an optional preset key "
        "(`gptlab config` writes one)",
    )
    p.add_argument(
        "--epochs",
        type=_number(int, AT_LEAST_ONE),
        metavar="N",
        help="passes over the data (the schedule spans them: train.budget = steps)",
    )
    p.add_argument(
        "--max-steps",
        type=_number(int, AT_LEAST_ONE),
        metavar="N",
        help="optimizer steps (the schedule spans them: train.budget = steps)",
    )
    p.add_argument(
        "--max-time",
        type=_number(float, C.POSITIVE),
        metavar="SECONDS",
        help="seconds of training steps: the time budget (the default preset's schedule "
        "spans it), or a safety net beside --epochs/--max-steps",
    )
    train_fields = {f.name: f for f in dataclasses.fields(C.TrainConfig)}
    for flag, (key, metavar) in TRAIN_ALIASES.items():
        f = train_fields[key.split(".")[1]]
        kind, bounds = type(f.default), C.field_range(f)
        p.add_argument(
            flag,
            action=_Override,
            key=key,
            dest=key,
            default=argparse.SUPPRESS,
            metavar=metavar or _metavar(f),
            type=_number(kind, bounds, keep_text=True) if bounds else None,
            help=_escape(f"{C.field_help(f)} (same as --{key})"),
        )


class _Override(argparse.Action):
    """Records `--section.field VALUE` (or a flag that stands for one field, like
    --precision) as (dotted key, text) in the order given; see config_overrides()."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        given = [*getattr(namespace, "_config_overrides", []), (self.key, values)]
        namespace._config_overrides = given


def config_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The config fields the user set on the command line, as (dotted key, text) in the order
    given: every --section.field VALUE and the flags that stand for one (--precision, ...)."""
    return list(getattr(args, "_config_overrides", []))


def _config_field_args(p: argparse.ArgumentParser) -> None:
    """Every config field as --section.field VALUE, one group per section, generated from the
    dataclasses: the meaning, choices and default in the help come from gptlab.config.schema."""
    base = C.preset(C.DEFAULT_PRESET)
    for section, cls in C.SECTION_TYPES.items():
        group = p.add_argument_group(
            f"{section} settings (the [{section}] table of a --config file)",
            f"{cls.__doc__.splitlines()[0]} Default: every preset's starting value; "
            f"'{C.DEFAULT_PRESET} preset': what the default preset changes it to.",
        )
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = json.dumps(f.default)
            preset_value = getattr(getattr(base, section), f.name)
            if preset_value != f.default:
                default += f"; {C.DEFAULT_PRESET} preset: {json.dumps(preset_value)}"
            group.add_argument(
                f"--{key}",
                action=_Override,
                key=key,
                dest=key,
                default=argparse.SUPPRESS,
                metavar=_metavar(f),
                help=_escape(f"{C.field_help(f)} (default: {default})"),
            )


def _metavar(f: dataclasses.Field) -> str:
    choices = C.field_choices(f)
    if choices:
        return "{" + ",".join(choices) + "}"
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(f.default), "TEXT")


def _escape(help_text: str) -> str:
    return help_text.replace("%", "%%")  # argparse formats help with %


def _generate_parser(sub) -> None:
    g = _command(sub, "generate", cmd_generate, help="continue a prompt with a trained model")
    g.add_argument(
        "--checkpoint",
        default="runs/latest",
        help="run or checkpoint directory (default: runs/latest)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        help="text to continue (default: 'Every effort moves you'); repeat for a batch of prompts",
    )
    g.add_argument("--max-new-tokens", type=_number(int, C.NON_NEGATIVE), default=100, metavar="N")
    g.add_argument(
        "--temperature",
        type=_number(float, C.NON_NEGATIVE),
        default=0.8,
        help="0 for greedy decoding (default: 0.8)",
    )
    g.add_argument(
        "--top-k",
        type=_number(int, C.NON_NEGATIVE, " (0: no top-k cut)"),
        default=50,
        metavar="K",
        help="sample among the K likeliest tokens; 0: all (default: 50)",
    )
    g.add_argument(
        "--top-p",
        type=_number(float, C.Range(0, 1, low_open=True)),
        default=None,
        metavar="P",
        help="sample among the likeliest tokens whose probability reaches P (default: off)",
    )
    g.add_argument("--seed", type=_number(int, SEED), default=None)
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    g.add_argument(
        "--chat",
        action="store_true",
        help="chat: each --prompt (or each line of stdin; typed at a terminal) is a user turn, "
        "the history re-rendered each turn by the run's chat template (a base model: the "
        "plays-style USER:/ASSISTANT: template)",
    )
    g.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message")
    g.add_argument(
        "--no-cache", action="store_true", help="recompute the whole window at every step"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the cached step with a static cache (CUDA: CUDA graphs; slow first call)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    _threads_arg(g)


def _convert_parser(sub) -> None:
    c = _command(
        sub,
        "convert",
        None,
        help="convert GPT-2 and Llama weights to and from Hugging Face transformers' format",
    )
    c.set_defaults(func=lambda args: _help_and_fail(c))
    csub = c.add_subparsers(dest="direction", metavar="DIRECTION")
    fh = _command(
        csub,
        "from-hf",
        cmd_convert_from_hf,
        help="a Hugging Face GPT-2 or Llama (directory or hub id) -> a gptlab run directory",
    )
    fh.add_argument("src", help="directory with config.json + model.safetensors, or a hub id")
    fh.add_argument("out_dir", help="new gptlab run directory")
    th = _command(
        csub,
        "to-hf",
        cmd_convert_to_hf,
        help="a gptlab run -> a directory transformers' from_pretrained loads",
    )
    th.add_argument("run_dir", help="gptlab run or checkpoint directory")
    th.add_argument("out_dir", help="new directory for config.json, model.safetensors, ...")
    ml = _command(
        csub,
        "merge-lora",
        cmd_convert_merge_lora,
        help="a LoRA finetune -> a plain gptlab run whose weights are base + adapters",
    )
    ml.add_argument("run_dir", help="a LoRA run (gptlab finetune --lora-rank R) or checkpoint")
    ml.add_argument("out_dir", help="new gptlab run directory")


def _plot_parser(sub) -> None:
    pl = _command(
        sub,
        "plot",
        cmd_plot,
        help="draw runs' plots from metrics.jsonl: loss, learning rate, throughput; "
        "several runs are also overlaid",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument(
        "--out", help="where the overlay of several runs goes (default: the first RUN_DIR)"
    )
    pl.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each run's metrics as TensorBoard events (RUN_DIR/tensorboard)",
    )


def _prepare_parser(sub) -> None:
    pr = _command(
        sub,
        "prepare",
        cmd_prepare,
        help="tokenize a corpus of any size into token shards for `gptlab train --data DIR`",
        description="Stream documents from files (.txt/.md: one document per file; .jsonl: "
        "one per line; .parquet: one per row), directories, globs, 'shakespeare' or hf:NAME, "
        "tokenize them in parallel and write token shards with a manifest. Re-running an "
        "interrupted preparation continues it.",
    )
    pr.add_argument("inputs", nargs="*", metavar="INPUT")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument(
        "--tokenizer",
        default="gpt2",
        help="gpt2 (default), char, or a trained tokenizer.json (or its directory)",
    )
    pr.add_argument(
        "--text-field", default="text", help="jsonl field / parquet column / dataset field"
    )
    pr.add_argument(
        "--val-ratio",
        type=_number(float, C.BELOW_ONE),
        default=0.1,
        help="share of the text for validation, in pieces (default: 0.1)",
    )
    pr.add_argument(
        "--seed", type=_number(int, SEED), default=1337, help="seed of the document split"
    )
    pr.add_argument(
        "--workers",
        type=_number(int, AT_LEAST_ONE),
        default=None,
        help="tokenizer processes (default: all cores)",
    )
    pr.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed jsonl lines and records without the text field (counted)",
    )
    pr.add_argument(
        "--shard-tokens",
        type=_number(int, AT_LEAST_ONE),
        default=None,
        help="tokens per shard file (default: 16,777,216)",
    )
    pr.add_argument(
        "--doc-separator",
        help="split .txt/.md files into documents at this text (e.g. '<|endoftext|>')",
    )
    pr.add_argument("--hf-split", default="train", help="split of hf:NAME datasets")
    pr.add_argument("--hf-config", default=None, help="configuration of hf:NAME datasets")
    pr.add_argument("--verify", action="store_true", help="re-check the shards of --out and exit")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")


def _tokenizer_parser(sub) -> None:
    tk = _command(sub, "tokenizer", None, help="train your own tokenizer")
    tk.set_defaults(func=lambda args: _help_and_fail(tk))
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    tt = _command(
        tk_sub,
        "train",
        cmd_tokenizer_train,
        help="train a byte-level BPE on your text",
        description="Train a byte-level BPE (GPT-2's kind) with the `tokenizers` library on the "
        "documents `gptlab prepare` would read, and save DIR/tokenizer.json. Use it with "
        "`gptlab prepare ... --tokenizer DIR` or `gptlab train --data.tokenizer DIR`.",
    )
    tt.add_argument("--data", nargs="+", required=True, metavar="INPUT", help="as for prepare")
    tt.add_argument(
        "--vocab-size", type=_vocab_size, required=True, help="ids, special token included"
    )
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.add_argument(
        "--min-frequency",
        type=_number(int, AT_LEAST_ONE),
        default=2,
        help="least count of a merged pair (default: 2)",
    )
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--doc-separator", default=None)
    tt.add_argument("--skip-bad", action="store_true")


def _eval_parser(sub) -> None:
    ev = _command(
        sub,
        "eval",
        cmd_eval,
        help="loss, perplexity and bits per byte of a trained model",
        description="Evaluate a run on --data (text: all of it; a prepared directory: its "
        "--split) or, by default, on the run's own validation split. Bits per byte count the "
        "UTF-8 bytes of the text, so they compare across tokenizers.",
    )
    ev.add_argument("--checkpoint", default="runs/latest", help="run or checkpoint directory")
    ev.add_argument("--data", help="text file/dir/glob, 'shakespeare', or a prepared directory")
    ev.add_argument(
        "--split", choices=("val", "train", "test"), default="val", help="test: finetuned runs only"
    )
    ev.add_argument("--batch-size", type=_number(int, AT_LEAST_ONE), default=8)
    ev.add_argument(
        "--max-batches",
        type=_number(int, AT_LEAST_ONE),
        default=None,
        help="stop after this many batches",
    )
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ev.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    tk = ev.add_argument_group(
        "downstream tasks",
        "Score multiple-choice or cloze items by log-likelihood, as lm-evaluation-harness "
        "does (accuracy, acc_norm, centred score), instead of loss on text.",
    )
    tk.add_argument(
        "--task",
        metavar="NAME_OR_FILE",
        help="a format (hellaswag, arc, piqa, copa, mc, lambada) with --task-data, or a "
        ".jsonl of items (format detected), or a suite .toml",
    )
    tk.add_argument(
        "--task-data", metavar="PATH", help="the items: .jsonl or hf:NAME[:CONFIG][@SPLIT]"
    )
    tk.add_argument("--suite", metavar="FILE.toml", help="several tasks with few-shot counts")
    tk.add_argument("--num-fewshot", type=_number(int, C.Range(0)), default=0, metavar="K")
    tk.add_argument(
        "--limit", type=_number(int, AT_LEAST_ONE), default=None, metavar="N",
        help="score only the first N items of each task",
    )  # fmt: skip
    tk.add_argument("--out", metavar="REPORT.json", help="write the report here when complete")
    _threads_arg(ev)


def _serve_parser(sub) -> None:
    s = _command(
        sub,
        "serve",
        cmd_serve,
        help="serve a model over an OpenAI-compatible HTTP API, with a page at /",
        description="Serve a trained model: /v1/completions, /v1/chat/completions and "
        "/v1/models as in OpenAI's API (the `openai` client works), a playground and run view "
        "at /, and /health. Concurrent requests share the model's forward passes. Needs the "
        "serve extra: pip install 'gptlab[serve]'.",
    )
    s.add_argument(
        "--checkpoint",
        default="runs/latest",
        help="run or checkpoint directory, or a Hugging Face GPT-2 folder (default: runs/latest)",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    s.add_argument(
        "--port",
        type=_number(int, C.Range(0, 65535)),
        default=8000,
        help="port to listen on (default: 8000; 0: any free port, which the first line names)",
    )
    s.add_argument(
        "--api-key",
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every endpoint but /health and the page",
    )
    s.add_argument(
        "--max-batch",
        type=_number(int, C.Range(1, 1024)),
        default=16,
        metavar="N",
        help="sequences decoded at once; more requests wait their turn (default: 16)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    s.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow first requests)"
    )
    _threads_arg(s, serve=True)


# --------------------------------------------------------------------------- train and config


def build_config(args: argparse.Namespace) -> tuple[C.RunConfig, str]:
    """(validated RunConfig, preset name) from `train`/`config` arguments: the preset, then the
    --config file, then --data, the limit flags and the config overrides in the order given.
    A resumed run without --preset/--config starts from its saved config ("resumed")."""
    cfg, preset_name, _ = resolve_config(args)
    return cfg, preset_name


def resolve_config(args: argparse.Namespace) -> tuple[C.RunConfig, str, str | None]:
    """build_config's (config, preset name), and the sizing line when `train.sizing = corpus`
    chose fields from the corpus (gptlab.recipes.sizing): only in a new run, and never a field the
    user set with a flag or in the --config file. A resume keeps its saved choice."""
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and saved and saved.is_file() and not (args.preset or args.config):
        cfg = C.RunConfig.from_dict(json.loads(saved.read_text()))
        preset_name = "resumed"
    else:
        cfg, preset_name = _preset_and_file(args.preset, args.config)
    if args.data:
        cfg.data.source = args.data
    if any(getattr(args, f) is not None for f in LIMIT_FLAGS):
        cfg.train.epochs = args.epochs or 0
        cfg.train.max_steps = args.max_steps or 0
        cfg.train.max_time = args.max_time or 0.0
        if cfg.train.epochs or cfg.train.max_steps:  # a step count: the schedule spans it
            cfg.train.budget = "steps"
    for key, value in config_overrides(args):
        C.set_field(cfg, key, value)
    _add_trackers(cfg, args)
    cfg.validate()
    line = None
    fresh = not (args.resume or getattr(args, "init_from", None))  # weights bring a shape
    if cfg.train.sizing == "corpus" and cfg.train.budget == "time" and fresh:
        line = _size_from_corpus(cfg, args)
    return cfg.validate(), preset_name, line


def _given_keys(args: argparse.Namespace) -> set[str]:
    """The dotted config keys the user set: flags, the limit flags and the --config file."""
    keys = {k for k, _ in config_overrides(args)}
    if any(getattr(args, f) is not None for f in LIMIT_FLAGS):
        keys |= {f"train.{f}" for f in LIMIT_FLAGS}
    if args.config:
        for section, values in C.load_toml(args.config).items():
            if isinstance(values, dict):
                keys |= {f"{section}.{k}" for k in values}
    return keys


def _size_from_corpus(cfg: C.RunConfig, args: argparse.Namespace) -> str | None:
    from gptlab.recipes import sizing

    try:
        total = sizing.corpus_bytes(cfg.data.source)
    except GptlabError:  # unreadable now: `gptlab config` still prints, training says why
        total = None
    if total is None:
        return (
            f"gptlab: sizing: the size of {cfg.data.source!r} is not known before it is read; "
            "the preset's shape and tokenizer are kept"
        )
    given = _given_keys(args)
    if given.issuperset(sizing.CHOSEN):  # a saved config, say: nothing left to choose
        return None
    choice = sizing.size_run(cfg, total * cfg.data.train_ratio, given)
    return choice.line(tuple(k for k in sizing.CHOSEN if k in given))


def _add_trackers(cfg: C.RunConfig, args: argparse.Namespace) -> None:
    """--tracker NAME (and --tensorboard) join train.trackers, so a resume logs there too."""
    added = (getattr(args, "tracker", None) or []) + (
        ["tensorboard"] if getattr(args, "tensorboard", False) else []
    )
    if added:
        names = [*C.tracker_names(cfg.train.trackers), *added]
        cfg.train.trackers = ",".join(dict.fromkeys(names))


def _preset_and_file(preset: str | None, config_file: str | None) -> tuple[C.RunConfig, str]:
    """The preset's config with the TOML file applied, and the preset's name; a --preset that
    disagrees with the file's own `preset` is an error, not a silent choice."""
    file_cfg = C.load_toml(config_file) if config_file else {}
    file_preset = file_cfg.pop("preset", None)
    if preset and file_preset is not None and preset != file_preset:
        raise GptlabError(
            f"--preset {preset} disagrees with preset = {file_preset!r} in {config_file}; "
            "drop one of them"
        )
    name = preset or file_preset or C.DEFAULT_PRESET
    cfg = C.preset(name)
    C.apply_nested(cfg, file_cfg, origin=f"config file {config_file}")
    return cfg, name


def build_finetune_config(args: argparse.Namespace) -> C.RunConfig:
    """The finetune's RunConfig: a resumed run's saved one, else the defaults with the book's
    finetuning schedule (C.FINETUNE_TRAIN), then --config, --data, the limits, the overrides."""
    if args.preset:
        raise GptlabError(
            "gptlab finetune takes its model from --init-from; drop --preset (use --config for settings)"
        )
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and saved and saved.is_file() and not args.config:
        cfg = C.RunConfig.from_dict(json.loads(saved.read_text()))
    else:
        cfg = C.RunConfig.from_dict({"train": dict(C.FINETUNE_TRAIN)})
        if args.config:
            file_cfg = C.load_toml(args.config)
            file_cfg.pop("preset", None)
            C.apply_nested(cfg, file_cfg, origin=f"config file {args.config}")
        if not args.data and not args.resume:
            raise GptlabError("gptlab finetune needs --data FILE.jsonl: the records to learn from")
    if args.data:
        cfg.data.source = args.data
    if any(getattr(args, f) is not None for f in LIMIT_FLAGS):
        cfg.train.epochs = args.epochs or 0
        cfg.train.max_steps = args.max_steps or 0
        cfg.train.max_time = args.max_time or 0.0
    for key, value in config_overrides(args):
        C.set_field(cfg, key, value)
    _add_trackers(cfg, args)
    # The model comes from --init-from: the checks across sections wait for it (finetune()).
    for section in ("train", "data", "finetune"):
        getattr(cfg, section).validate()
    return cfg


def cmd_finetune(args: argparse.Namespace) -> int:
    from gptlab.finetune.run import finetune
    from gptlab.observe.console import ConsoleView

    cfg = build_finetune_config(args)
    view = ConsoleView(quiet=args.quiet, note=_apply_threads(args))
    try:
        result = finetune(
            cfg,
            args.out,
            resume=args.resume,
            init_from=args.init_from,
            model_keys=_model_keys(args) if args.init_from else (),
            on_event=view,
        )
    finally:
        view.close()
    status = _report_end(
        result,
        "finetune",
        "finetuning stopped on non-finite steps; resume with a lower --train.lr",
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


def cmd_config(args: argparse.Namespace) -> int:
    cfg, preset_name = build_config(args)  # what the sizing chose is in it (a fixed point)
    sys.stdout.write(C.to_toml(cfg, preset_name))
    return 0


def _model_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The model fields the user set (flags and --config file): `--init-from` checks them."""
    keys = [k.split(".", 1)[1] for k, _ in config_overrides(args) if k.startswith("model.")]
    if args.config:
        keys += list(C.load_toml(args.config).get("model", {}))
    return tuple(keys)


def cmd_train(args: argparse.Namespace) -> int:
    from gptlab.observe.console import ConsoleView
    from gptlab.train.loop import train

    note = _apply_threads(args)  # first: the corpus sizing measures speed on these threads
    cfg, preset_name, sizing_line = resolve_config(args)
    if sizing_line and os.environ.get("RANK", "0") == "0":  # the run's first line, once
        print(sizing_line, flush=True)  # stdout: stderr is kept for the one-line errors
    view = ConsoleView(quiet=args.quiet, note=note)
    try:
        result = train(
            cfg,
            args.out,
            resume=args.resume,
            init_from=args.init_from,
            model_keys=_model_keys(args) if args.init_from else (),
            on_event=view,
            name=preset_name,
        )
    finally:
        view.close()
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


def _report_end(result, command: str, nonfinite: str) -> int | None:
    """What train and finetune print when the run ends (rank 0 only), and the exit status
    when it did not end well (a signal, non-finite steps; other ranks exit alike, silently);
    None when it finished."""
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


# --------------------------------------------------------------------------- generate and plot


def _text_model(run, command: str):
    """The run, unless it is a classifier, which writes no text."""
    if run.config.model.num_classes:
        raise GptlabError(
            f"{command} needs a language model; this run is a classifier of "
            f"{run.config.model.num_classes} classes (gptlab finetune); evaluate it with gptlab eval"
        )
    return run


def cmd_generate(args: argparse.Namespace) -> int:
    from gptlab.infer.sampling import complete, stream_text
    from gptlab.interop.runs import open_run

    if args.system is not None and not args.chat:
        raise GptlabError("--system needs --chat")
    prompts = args.prompt or ["Every effort moves you"]
    note = _apply_threads(args)
    run = _text_model(open_run(args.checkpoint, args.device), "generate")
    model, tokenizer = run.model, run.tokenizer
    if args.chat:
        _print_note(note)
        return _chat(args, run)
    for prompt in prompts:
        if not tokenizer.encode(prompt):
            raise GptlabError("--prompt is empty; give some text to continue")
    _print_note(note)
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        compile=args.compile,
    )
    if len(prompts) == 1:  # stream: print each piece as its tokens arrive
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        for piece in stream_text(
            model, tokenizer, prompts[0], args.max_new_tokens, args.stop, **sampling
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    texts = complete(model, tokenizer, prompts, args.max_new_tokens, args.stop, **sampling)
    for n, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        print(("\n" if n else "") + f"[{n + 1}] {prompt}{text}")
    return 0


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        compile=args.compile,
    )


def _user_turns(args: argparse.Namespace) -> Iterator[str]:
    """The user's turns: the --prompt texts, else stdin's lines (with a prompt at a terminal)."""
    if args.prompt:
        yield from args.prompt
    elif sys.stdin.isatty():
        while True:
            try:
                yield input("> ")
            except (EOFError, KeyboardInterrupt):
                sys.stdout.write("\n")
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def _chat(args: argparse.Namespace, run) -> int:
    """`generate --chat`: each reply streamed on its own line; the oldest turns are dropped
    when the history outgrows the context window."""
    from gptlab.data.chat import chat_prompt
    from gptlab.infer.sampling import stream_ids

    context = run.config.model.context_length
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    for user in _user_turns(args):
        if not user.strip():
            if args.prompt:
                raise GptlabError("--prompt is empty; give some text to say")
            continue
        history.append({"role": "user", "content": user})
        prompt = chat_prompt(run.chat_template, run.tokenizer, system + history)
        while len(prompt.ids) > context and len(history) > 1:
            history = history[2:]  # the oldest user turn and its reply
            prompt = chat_prompt(run.chat_template, run.tokenizer, system + history)
        if len(prompt.ids) > context:
            raise GptlabError(
                f"the chat prompt is {len(prompt.ids)} tokens, longer than the context window "
                f"of {context}; shorten the message or the --system text"
            )
        room = context - len(prompt.ids) + 1  # the last token sampled is never fed back
        pieces = []
        for piece in stream_ids(
            run.model,
            run.tokenizer,
            prompt.ids,
            min(args.max_new_tokens, room),
            (*prompt.stop, *args.stop),
            prompt.stop_ids,
            **_sampling(args),
        ):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def cmd_convert_from_hf(args: argparse.Namespace) -> int:
    from gptlab.interop.hf import convert_from_hf, matching_preset
    from gptlab.model.gpt import GPTModel, count_parameters

    ckpt, cfg = convert_from_hf(args.src, args.out_dir)
    preset = matching_preset(cfg)
    params = count_parameters(GPTModel(cfg)) if cfg.n_layers * cfg.emb_dim < 20_000 else None
    shape = f"{cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads"
    print(
        f"wrote {ckpt} ({shape}"
        + (f", {params / 1e6:.1f}M parameters" if params else "")
        + (f"; the {preset} shape" if preset else "")
        + ")"
    )
    print(f'try it: gptlab generate --checkpoint {args.out_dir} --prompt "Every effort moves you"')
    return 0


def cmd_convert_to_hf(args: argparse.Namespace) -> int:
    from gptlab.interop.hf import convert_to_hf

    names = convert_to_hf(args.run_dir, args.out_dir)
    print(f"wrote {args.out_dir}: {', '.join(names)}")
    if "tokenizer_config.json" not in names:
        print(
            "note: a char-tokenizer run: no Hugging Face tokenizer files were written "
            "(transformers has no such tokenizer); the weights and config load as usual",
            file=sys.stderr,
        )
    print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(args.out_dir)!r})")
    return 0


def cmd_convert_merge_lora(args: argparse.Namespace) -> int:
    from gptlab.interop.runs import merge_lora_run

    ckpt, n = merge_lora_run(args.run_dir, args.out_dir)
    print(f"wrote {ckpt} ({n} adapted layers merged into their weights; no base needed)")
    print(f"use it: gptlab generate --checkpoint {args.out_dir}  (or gptlab eval, serve)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptlab.observe.plot import plot_compare, plot_lr, plot_run, plot_tasks, plot_throughput

    for run in args.run_dirs:
        try:
            png = plot_run(run)
            print(f"wrote {png} and {png.with_suffix('.pdf')}")
        except GptlabError as e:
            if (
                len(args.run_dirs) == 1
                or "metrics.jsonl" in str(e)
                and "no evaluations" not in str(e)
            ):
                raise
            print(f"{run}: no loss plot ({e})")
        for fn in (plot_lr, plot_throughput, plot_tasks):
            png = fn(run)
            if png is not None:
                print(f"wrote {png}")
        if args.tensorboard:
            from gptlab.observe.trackers import write_run

            print(f"wrote TensorBoard events to {write_run(run)} (tensorboard --logdir {run})")
    if len(args.run_dirs) > 1:
        png = plot_compare(args.run_dirs, args.out or args.run_dirs[0])
        print(f"wrote {png} (the runs overlaid)")
    return 0


# --------------------------------------------------------------------------- prepare, tokenizer, eval


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data.prepare import DEFAULT_SHARD_TOKENS, prepare, verify

    if args.verify:
        problems = verify(args.out)
        for p in problems:
            print(f"{args.out}: {p}")
        if problems:
            raise GptlabError(
                f"{len(problems)} shard(s) of {args.out!r} fail the check; prepare again"
            )
        print(f"{args.out}: all shards match the manifest")
        return 0
    if not args.inputs:
        raise GptlabError("no inputs: give files, directories, globs, shakespeare or hf:NAME")
    tokenizer = args.tokenizer
    if tokenizer not in ("gpt2", "char") and Path(tokenizer).expanduser().exists():
        # recorded absolute, so runs can find it from anywhere (the manifest also holds it inline)
        tokenizer = str(Path(tokenizer).expanduser().resolve())
    from gptlab.observe.console import PrepareView

    view = PrepareView(quiet=args.quiet)
    try:
        manifest = prepare(
            args.inputs,
            args.out,
            tokenizer,
            text_field=args.text_field,
            val_ratio=args.val_ratio,
            seed=args.seed,
            workers=args.workers,
            skip_bad=args.skip_bad,
            shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
            doc_separator=args.doc_separator,
            hf_split=args.hf_split,
            hf_config=args.hf_config,
            on_event=view,
        )
    except KeyboardInterrupt:
        view.close()
        print("\ngptlab: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    view.close()
    for split, s in manifest["splits"].items():
        print(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
            f"{s['bytes']:,} bytes, {len(s['shards'])} shard(s)"
        )
    if manifest["skipped"]["count"]:
        print(
            f"skipped {manifest['skipped']['count']:,} bad records, e.g. {manifest['skipped']['examples'][0]}"
        )
    if manifest["val_ratio"] > 0 and not manifest["splits"]["val"]["documents"]:
        print(
            "warning: the validation split is empty (too little text to cut into pieces for it); "
            "raise --val-ratio or give more text",
            file=sys.stderr,
        )
    print(f"train on it: gptlab train --data {args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from gptlab.data.bpe import train_bpe
    from gptlab.data.sources import iter_texts

    texts = iter_texts(
        args.data,
        text_field=args.text_field,
        doc_separator=args.doc_separator,
        skip_bad=args.skip_bad,
    )
    t0 = time.perf_counter()
    tok = train_bpe(texts, args.vocab_size, args.min_frequency)
    path = tok.save(args.out)
    print(f"wrote {path}: {tok.n_vocab:,} ids in {time.perf_counter() - t0:.1f} s")
    print(
        f"use it: gptlab prepare INPUTS --out DIR --tokenizer {args.out}, "
        f"or gptlab train --data.tokenizer {args.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptlab.evals.loss import evaluate_run
    from gptlab.finetune.run import evaluate_finetuned, is_finetuned
    from gptlab.interop.runs import open_run

    note = _apply_threads(args)
    if args.task or args.suite:
        return _eval_tasks(args)
    if args.task_data or args.out:
        raise GptlabError("--task-data and --out go with --task or --suite")
    run = open_run(args.checkpoint, args.device)
    if is_finetuned(run.config):
        r = evaluate_finetuned(run, args.data, args.split, args.batch_size)
        r = {"data": r["data"], "checkpoint": args.checkpoint, **r}
        if args.json:
            print(json.dumps(r))
        else:
            print(f"data: {r['data']}: {r['examples']:,} {r['format']} records")
            line = f"loss {r['loss']:.4f} on the learned tokens"
            if "accuracy" in r:
                line += f" | accuracy {100 * r['accuracy']:.2f}%"
            print(line)
        return 0
    r = evaluate_run(run, args.data, args.split, args.batch_size, args.max_batches, args.precision)
    r = {"data": r["data"], "checkpoint": args.checkpoint, **r}
    _print_note(note)
    if args.json:
        print(json.dumps(r))
    else:
        T = run.config.model.context_length
        print(f"data: {r['data']}: {r['tokens']:,} tokens in {r['windows']:,} windows of {T}")
        print(
            f"loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | "
            f"bits per byte {r['bits_per_byte']:.4f} ({r['bytes']:,} bytes)"
        )
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    from gptlab.evals import tasks
    from gptlab.interop.runs import open_run
    from gptlab.runtime import dist as dist_lib
    from gptlab.runtime.device import resolve_device

    if args.task and args.suite:
        raise GptlabError("give --task or --suite, not both")
    if args.suite:
        suite = tasks.load_suite(args.suite)
    else:
        suite = tasks.task_suite(args.task, args.task_data, num_fewshot=args.num_fewshot)
    if args.out:
        tasks.check_report_path(args.out)
    d = dist_lib.setup(resolve_device(args.device))  # under torchrun: items shared by ranks
    try:
        run = open_run(args.checkpoint, d.device if d.enabled else args.device)
        r = tasks.evaluate_run_tasks(
            run, suite, batch_size=args.batch_size, precision=args.precision, dist=d,
            max_items=args.limit,
        )  # fmt: skip
    finally:
        dist_lib.shutdown()
    if not d.is_main:
        return 0
    if args.out:
        tasks.write_report(args.out, r)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{'task':<16} {'items':>6} {'cut':>4} {'acc':>7} {'acc_norm':>8} {'centred':>8}")
    for name, t in r["tasks"].items():
        norm = f"{t['acc_norm']:.4f}" if "acc_norm" in t else "-"
        print(
            f"{name:<16} {t['n_items']:>6} {t['n_truncated']:>4} {t['acc']:>7.4f} {norm:>8} "
            f"{t['centred']:>8.4f}"
        )
        if "perplexity" in t:
            print(f"{'':<16} last-word perplexity {t['perplexity']:.2f}")
    print(f"core (mean centred): {r['core']:.4f}" + (f"; report: {args.out}" if args.out else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn")):
        raise GptlabError("gptlab serve needs its web stack: pip install 'gptlab[serve]'")
    import torch

    from gptlab.infer.serve import serve
    from gptlab.interop.runs import open_run

    note = _apply_threads(args, reserve=1)  # a core for the HTTP loop beside the engine's
    run = _text_model(open_run(args.checkpoint, args.device), "serve")
    if args.compile:
        # shapes change with the batch and the cache length at every step: compile dynamic
        run.model = torch.compile(run.model, dynamic=True)

    def ready(url: str) -> None:
        _print_note(note)
        key = " (API key required)" if args.api_key else ""
        print(f"serving {args.checkpoint} at {url}{key}: page at /, OpenAI API at /v1", flush=True)

    serve(run, args.host, args.port, args.api_key, args.max_batch, args.precision, on_ready=ready)
    return 0


def lm_eval_main() -> int:
    """`gptlab-lm-eval`: lm-evaluation-harness's own command line (the same arguments as
    `lm_eval`), with the model `gptlab` registered first. lm-eval 0.4.x resolves `--model`
    only among its built-in models and classes registered in the running process (it loads
    no plugins), so plain `lm_eval --model gptlab` cannot find it."""
    try:
        import lm_eval.__main__ as lm_eval_cli

        import gptlab.evals.harness  # noqa: F401  registers --model gptlab
    except ModuleNotFoundError as e:
        missing = (
            "lm-evaluation-harness (lm_eval)" if (e.name or "").startswith("lm_eval") else e.name
        )
        print(
            f"gptlab-lm-eval: error: {missing} is not installed; pip install 'gptlab[eval]'",
            file=sys.stderr,
        )
        return 2
    try:
        lm_eval_cli.cli_evaluate()
    except GptlabError as e:
        print(f"gptlab-lm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
