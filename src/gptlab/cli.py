"""`gptlab train | generate | plot | prepare | tokenizer train | eval | convert`: the only
code that reads argv, prints for the user or exits.

User mistakes (GptlabError) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

LIMIT_FLAGS = ("epochs", "max_steps", "max_time")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command != "train" and rest:
            raise GptlabError(
                f"unknown argument {rest[0]!r} for `gptlab {args.command}`; see gptlab {args.command} --help"
            )
        return args.func(args, rest)
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
    like every other user error, instead of a usage block and a bare exit."""

    def error(self, message: str):
        raise GptlabError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptlab", description="Pretrain GPT-style language models from scratch.")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser(
        "train",
        help="train a model (default: the `cpu` preset on Shakespeare, ~10 minutes on 2 CPU cores)",
        description="Train a model. Any config field can be set as --section.field VALUE "
        "(e.g. --train.lr 3e-4, --model.n_layers 6). The limit flags replace the preset's limits; "
        "given together, training stops at whichever comes first.",
    )
    t.add_argument(
        "--data",
        help="file, directory or glob of .txt/.md files, 'shakespeare' (default), "
        "or a directory written by `gptlab prepare` (streamed from disk)",
    )
    t.add_argument(
        "--preset",
        help="model/run preset: tiny, cpu (default), gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, walkthrough",
    )
    t.add_argument(
        "--config",
        help="TOML file with [model], [train], [data] sections (and an optional preset key)",
    )
    t.add_argument(
        "--out",
        help="run directory (default: runs/<preset>-<time>; runs/latest points at the newest)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    t.add_argument("--epochs", type=int, help="passes over the training data")
    t.add_argument("--max-steps", type=int, help="optimizer steps")
    t.add_argument("--max-time", type=float, help="seconds of training")
    t.add_argument("--precision", help="auto, fp32, bf16 or fp16 (same as --train.precision)")
    t.add_argument("--compile", help="auto, on or off (same as --train.compile)")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (same as --train.device)")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="save a checkpoint every STEPS steps (same as --train.checkpoint_every)",
    )
    t.add_argument(
        "--checkpoint-every-minutes",
        type=float,
        metavar="M",
        help="save a checkpoint every M minutes (same as --train.checkpoint_every_minutes)",
    )
    t.add_argument(
        "--keep-last",
        type=int,
        metavar="K",
        help="keep the newest K checkpoints, plus the best by validation loss (same as --train.keep_last)",
    )
    t.add_argument(
        "--parallel", help="under torchrun: ddp (default) or fsdp (same as --train.parallel)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--init-from",
        metavar="SRC",
        help="start from these weights: a gptlab run, a Hugging Face GPT-2 directory or a hub id "
        "(gpt2, gpt2-medium, ...); the model config comes from SRC (only --model.drop_rate and "
        "--model.attention may change)",
    )
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard events to RUN_DIR/tensorboard (needs `tensorboard`)",
    )
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue a prompt with a trained model")
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
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    g.add_argument(
        "--no-cache", action="store_true", help="recompute the whole window at every step"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the cached step with a static cache (CUDA: CUDA graphs; slow first call)",
    )
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "convert", help="convert GPT-2 weights to and from Hugging Face transformers' format"
    )
    csub = c.add_subparsers(dest="direction")
    fh = csub.add_parser(
        "from-hf",
        help="a Hugging Face GPT-2 (directory or hub id) -> a gptlab run directory",
    )
    fh.add_argument("src", help="directory with config.json + model.safetensors, or a hub id")
    fh.add_argument("out_dir", help="new gptlab run directory")
    fh.set_defaults(func=cmd_convert_from_hf)
    th = csub.add_parser(
        "to-hf", help="a gptlab run -> a directory transformers' from_pretrained loads"
    )
    th.add_argument("run_dir", help="gptlab run or checkpoint directory")
    th.add_argument("out_dir", help="new directory for config.json, model.safetensors, ...")
    th.set_defaults(func=cmd_convert_to_hf)
    c.set_defaults(func=lambda args, rest: _usage(c))

    pl = sub.add_parser(
        "plot",
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
    pl.set_defaults(func=cmd_plot)

    pr = sub.add_parser(
        "prepare",
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
    pr.add_argument("--val-ratio", type=float, default=0.1, help="share of documents (0.1)")
    pr.add_argument("--seed", type=int, default=1337, help="seed of the document split")
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (all cores)")
    pr.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed jsonl lines and records without the text field (counted)",
    )
    pr.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        help="tokens per shard file (default 16,777,216)",
    )
    pr.add_argument(
        "--doc-separator",
        help="split .txt/.md files into documents at this text (e.g. '<|endoftext|>')",
    )
    pr.add_argument("--hf-split", default="train", help="split of hf:NAME datasets")
    pr.add_argument("--hf-config", default=None, help="configuration of hf:NAME datasets")
    pr.add_argument("--verify", action="store_true", help="re-check the shards of --out and exit")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_prepare)

    tk = sub.add_parser("tokenizer", help="train your own tokenizer")
    tk_sub = tk.add_subparsers(dest="tokenizer_command")
    tt = tk_sub.add_parser(
        "train",
        help="train a byte-level BPE on your text",
        description="Train a byte-level BPE (GPT-2's kind) with the `tokenizers` library on the "
        "documents `gptlab prepare` would read, and save DIR/tokenizer.json. Use it with "
        "`gptlab prepare ... --tokenizer DIR` or `gptlab train --data.tokenizer DIR`.",
    )
    tt.add_argument("--data", nargs="+", required=True, metavar="INPUT", help="as for prepare")
    tt.add_argument("--vocab-size", type=int, required=True, help="ids, special token included")
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--doc-separator", default=None)
    tt.add_argument("--skip-bad", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)
    tk.set_defaults(func=lambda args, rest: (tk.print_help(), 2)[1])

    ev = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a trained model",
        description="Evaluate a run on --data (text: all of it; a prepared directory: its "
        "--split) or, by default, on the run's own validation split. Bits per byte count the "
        "UTF-8 bytes of the text, so they compare across tokenizers.",
    )
    ev.add_argument("--checkpoint", default="runs/latest", help="run or checkpoint directory")
    ev.add_argument("--data", help="text file/dir/glob, 'shakespeare', or a prepared directory")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", default="fp32", help="fp32 (default), bf16 or fp16")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)
    return p


# --------------------------------------------------------------------------- train


def parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
    """['--train.lr', '3e-4', '--model.n_layers=4'] -> [('train.lr', '3e-4'), ('model.n_layers', '4')]."""
    pairs, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise GptlabError(
                f"unknown argument {arg!r}; config fields are set as --section.field VALUE"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise GptlabError(f"{arg} needs a value")
            key, value = arg[2:], rest[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def build_config(args: argparse.Namespace, rest: list[str]):
    from gptlab import config as C

    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and saved and saved.is_file() and not (args.preset or args.config):
        cfg = C.RunConfig.from_dict(json.loads(saved.read_text()))
        preset_name = "resumed"
    else:
        file_cfg = C.load_toml(args.config) if args.config else {}
        preset_name = args.preset or file_cfg.pop("preset", None) or C.DEFAULT_PRESET
        file_cfg.pop("preset", None)
        cfg = C.preset(preset_name)
        C.apply_nested(cfg, file_cfg, origin=f"config file {args.config}")
    if args.data:
        cfg.data.source = args.data
    if any(getattr(args, f) is not None for f in LIMIT_FLAGS):
        cfg.train.epochs = args.epochs or 0
        cfg.train.max_steps = args.max_steps or 0
        cfg.train.max_time = args.max_time or 0.0
    for flag in ("precision", "compile", "device", "parallel"):
        if getattr(args, flag):
            C.set_field(cfg, f"train.{flag}", getattr(args, flag))
    for flag in ("checkpoint_every", "checkpoint_every_minutes", "keep_last"):
        if getattr(args, flag) is not None:
            C.set_field(cfg, f"train.{flag}", getattr(args, flag))
    for key, value in parse_overrides(rest):
        C.set_field(cfg, key, value)
    return cfg.validate(), preset_name


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# Model fields `train --init-from` lets the user change: they do not shape the weights.
INIT_FROM_FREE = ("drop_rate", "attention")


def init_from_source(args: argparse.Namespace, rest: list[str], cfg):
    """For `train --init-from SRC`: (cfg with SRC's model config, source model, tokenizer identity)."""
    from dataclasses import replace

    from gptlab import config as C
    from gptlab import dist
    from gptlab.hf import load_any

    if args.resume:
        raise GptlabError(
            "--init-from starts a new run from other weights and --resume continues one; use one of them"
        )
    user_keys = [k.split(".", 1)[1] for k, _ in parse_overrides(rest) if k.startswith("model.")]
    if args.config:
        user_keys += list(C.load_toml(args.config).get("model", {}))
    fixed = [k for k in user_keys if k not in INIT_FROM_FREE]
    if fixed:
        raise GptlabError(
            f"--init-from takes the model config from the source; model.{fixed[0]} cannot be set "
            f"(only {', '.join('model.' + k for k in INIT_FROM_FREE)})"
        )
    if dist.detect().is_main:
        print(f"gptlab: loading weights from {args.init_from!r}", flush=True)
    source, identity = load_any(args.init_from)
    changes = {k: getattr(cfg.model, k) for k in user_keys}
    cfg.model = replace(source.cfg, **changes)
    return cfg.validate(), source, identity


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    cfg, preset_name = build_config(args, rest)
    source = None
    if args.init_from:
        cfg, source, source_tokenizer = init_from_source(args, rest, cfg)
    run_dir = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if args.resume and not args.out:
        raise GptlabError("--resume needs --out RUN_DIR: the run to continue")
    if run_dir.exists() and not run_dir.is_dir():
        raise GptlabError(
            f"--out {str(run_dir)!r} is a file, not a directory; choose another --out"
        )
    taken = [] if args.resume else _run_files_in(run_dir)
    if taken:
        raise GptlabError(
            f"{str(run_dir)!r} already holds {', '.join(taken)}, which a new run would overwrite; "
            "add --resume to continue that run, or choose another --out"
        )

    import torch

    from gptlab import dist
    from gptlab.data import is_prepared, load_corpus, read_manifest
    from gptlab.plot import plot_run
    from gptlab.trainer import Trainer, stop_on_signals

    # Under torchrun every rank runs this command; only global rank 0 talks to the user.
    main = dist.detect().is_main
    if is_prepared(cfg.data.source):
        manifest = read_manifest(cfg.data.source)
        # the prepared data fixes the tokenizer and the split; the config records which
        cfg.data.tokenizer = manifest["tokenizer_name"]
        if main:
            print(
                f"gptlab: streaming prepared data {cfg.data.source!r} ({cfg.data.tokenizer} "
                "tokenizer, its own train/val split)",
                flush=True,
            )
    elif main:
        print(
            f"gptlab: loading data {cfg.data.source!r} ({cfg.data.tokenizer} tokenizer)", flush=True
        )
    corpus = load_corpus(
        cfg.data.source, cfg.data.tokenizer, cfg.data.train_ratio, split=cfg.data.split
    )
    if is_prepared(cfg.data.source) and len(corpus.val) <= cfg.model.context_length:
        raise GptlabError(
            f"the validation split of {cfg.data.source!r} has {len(corpus.val)} tokens, fewer than "
            f"one context window ({cfg.model.context_length + 1}); prepare it again with a larger "
            "--val-ratio or more documents (or --doc-separator to split text files)"
        )
    init_weights = None
    if source is not None:
        ours = corpus.tokenizer.identity()
        if ours != source_tokenizer:
            kind = source_tokenizer.get("type")
            raise GptlabError(
                f"--init-from: {args.init_from!r} was trained with a {kind} tokenizer"
                + (" of another vocabulary" if ours.get("type") == kind else "")
                + f" but this data uses a {ours.get('type')} one; use data tokenized the same way"
            )

        def init_weights(model):
            model.load_state_dict(source.state_dict())

    elif corpus.tokenizer.identity()["type"] != "gpt2":
        # char and trained vocabularies are sized by their tokenizer
        cfg.model.vocab_size = corpus.tokenizer.n_vocab
    try:  # a char vocabulary may lack the prompt's characters: say so now, not after training
        corpus.tokenizer.encode(cfg.train.start_context)
    except GptlabError as e:
        raise GptlabError(
            f"train.start_context {cfg.train.start_context!r} cannot be encoded ({e}); "
            "set --train.start_context to text from your data"
        ) from None
    view = ConsoleView(quiet=args.quiet)
    trainer = Trainer(
        cfg, corpus, run_dir, resume=args.resume, on_event=view, init_weights=init_weights
    )
    source = None  # init_weights ran in Trainer(); free this copy of the weights
    if main:
        _point_latest(run_dir)
    tb = None
    if args.tensorboard and main:
        from gptlab.tb import TensorBoardWriter

        tb = TensorBoardWriter(run_dir / "tensorboard", purge_step=trainer.state.step or None)
        trainer.on_event = _fan_out(view, tb)
    try:
        with stop_on_signals(trainer):
            end = trainer.run()
    finally:
        view.close()
        if tb is not None:
            tb.close()
    # Only after a clean end: a rank that raised exits without waiting on the others.
    dist.shutdown()
    if not main:  # the same exit status as rank 0, without its messages
        return {"SIGINT": 130, "SIGTERM": 143, "nonfinite": 1}.get(end["reason"], 0)
    try:
        png = plot_run(run_dir)
        print(f"loss plot: {png} (and .pdf)")
    except GptlabError:
        pass
    print(f"checkpoint: {end['checkpoint']}")
    if end["reason"] in ("SIGINT", "SIGTERM"):
        print(
            f"stopped by {end['reason']} at step {end['step']}; resume with: gptlab train --out {run_dir} --resume"
        )
        return 130 if end["reason"] == "SIGINT" else 143
    if end["reason"] == "nonfinite":
        print(
            f"gptlab: error: training stopped after {cfg.train.max_bad_steps} consecutive non-finite steps; "
            "the last good weights are saved; resume with a lower --train.lr "
            "(or train with --train.on_nonfinite rollback)",
            file=sys.stderr,
        )
        return 1
    print(f'try it: gptlab generate --checkpoint {run_dir} --prompt "{cfg.train.start_context}"')
    del torch
    return 0


def _fan_out(*views):
    def on_event(record: dict[str, Any]) -> None:
        for v in views:
            v(record)

    return on_event


# What a run writes into its directory: a new run must find none of them there.
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "loss-plot.pdf", "loss-plot.png")


def _run_files_in(run_dir: Path) -> list[str]:
    """The run files (and a non-empty checkpoints/) already in run_dir."""
    taken = [name for name in RUN_FILES if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        taken.insert(0, "checkpoints/")
    return taken


def _point_latest(run_dir: Path) -> None:
    """Make runs/latest point at this run (a convenience; failures are harmless)."""
    if run_dir.parent.name != "runs":
        return
    link = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass


class ConsoleView:
    """Renders trainer events: a tqdm progress bar, evaluation lines and samples."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, r: dict[str, Any]) -> None:
        ev = r["event"]
        if ev == "start":
            limit = r["total_steps"] or None
            world = r.get("world_size", 1)
            procs = f" | {world} processes ({r['parallel']})" if world > 1 else ""
            self._print(
                f"model: {r['params'] / 1e6:.2f}M parameters | device {r['device']} | precision {r['precision']}"
                f"{' | compiled' if r['compiled'] else ''}{procs} | {r['batch_tokens']} tokens/step ({r['accum']} micro-batches)"
                f" | {r['train_tokens']:,} train / {r['val_tokens']:,} val tokens"
            )
            # A bar only on a terminal: in a log file or pipe its redraws are noise, and one
            # plain line per logged step is what a reader (or a supervising script) wants.
            if not self.quiet and sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=limit, initial=r["step"], unit="step", dynamic_ncols=True, smoothing=0.1
                )
        elif ev == "resume":
            self._print(f"resuming from {r['checkpoint']} (step {r['step']})")
            for c in r["changed"]:
                self._print(f"  changed: {c}")
        elif ev == "train":
            if self.bar is not None:
                self.bar.n = r["step"]
                self.bar.set_postfix_str(
                    f"loss {r['loss']:.3f} | {r['tokens'] / 1e6:.2f}M tok | {r['tokens_per_s']:,.0f} tok/s"
                    f" | MFU {100 * r['mfu']:.1f}%",
                    refresh=True,
                )
            elif not self.quiet:
                self._print(
                    f"step {r['step']}: loss {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s"
                )
        elif ev == "eval":
            # The walk-through's labels for the step just done: its 0-based index, and the
            # 1-based epoch holding it (the step that ends epoch 4 is in epoch 4, though
            # 4.0 epochs are done). r["step"] counts the steps done.
            step, epoch = max(r["step"] - 1, 0), max(1, math.ceil(r["epoch"]))
            self._print(
                f"Ep {epoch} (Step {step:06d}): Train loss {r['train_loss']:.3f}, Val loss {r['val_loss']:.3f}"
            )
        elif ev == "sample":
            self._print("sample: " + r["text"].replace("\n", " / "))
        elif ev == "compile":
            self._print(f"compiled the model in {r['seconds']:.1f} s (first step)")
        elif ev == "nonfinite":
            self._print(
                f"step {r['step']}: non-finite loss or gradient, step skipped ({r['consecutive']} in a row)"
            )
        elif ev == "checkpoint_failed" and not r.get("final"):  # a final failure is an error
            self._print(f"warning: {r['error']} (training goes on)")
        elif ev == "rollback":
            self._print(
                f"step {r['from_step']}: non-finite steps; rolled back to {r['checkpoint']} "
                f"with learning rate x{r['lr_scale']:g}"
            )
        elif ev == "end":
            if self.bar is not None:
                self.bar.n = r["step"]
                self.bar.refresh()
            self.close()
            val = r.get("val_loss")
            print(
                f"done ({r['reason']}): {r['step']} steps, {r['tokens']:,} tokens in {r['train_time']:.0f} s"
                + (f", val loss {val:.3f}" if val is not None else "")
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- generate and plot


def load_run_model(path: str, device_name: str = "auto"):
    """(model, tokenizer, device) from a run or checkpoint directory."""
    from gptlab import checkpoint as ckpt_lib
    from gptlab.config import RunConfig
    from gptlab.model import GPTModel
    from gptlab.tokenizer import from_identity
    from gptlab.trainer import resolve_device

    ckpt = ckpt_lib.latest_checkpoint(path)
    meta = ckpt_lib.read_meta(ckpt)
    try:
        cfg = RunConfig.from_dict(meta["config"])
        tokenizer = from_identity(meta["tokenizer"])
    except (KeyError, TypeError, AttributeError) as e:  # AttributeError: a value of the wrong kind
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has incomplete or malformed metadata ({e}); use another checkpoint"
        ) from None
    device = resolve_device(device_name)
    model = GPTModel(cfg.model)
    ckpt_lib.load_weights(model, ckpt)
    return model.to(device).eval(), tokenizer, device


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.generate import complete, stream_text

    if args.max_new_tokens < 0:
        raise GptlabError("--max-new-tokens must be 0 or more")
    if args.temperature < 0:
        raise GptlabError("--temperature must be 0 or more")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise GptlabError("--top-p must be in (0, 1]")
    prompts = args.prompt or ["Every effort moves you"]
    model, tokenizer, device = load_run_model(args.checkpoint, args.device)
    for prompt in prompts:
        if not tokenizer.encode(prompt):
            raise GptlabError("--prompt is empty; give some text to continue")
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


def cmd_convert_from_hf(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.hf import convert_from_hf, matching_preset
    from gptlab.model import GPTModel, count_parameters

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


def cmd_convert_to_hf(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.hf import convert_to_hf

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


def cmd_plot(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.plot import plot_compare, plot_lr, plot_run, plot_throughput

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
        for fn in (plot_lr, plot_throughput):
            png = fn(run)
            if png is not None:
                print(f"wrote {png}")
        if args.tensorboard:
            from gptlab.tb import write_run

            print(f"wrote TensorBoard events to {write_run(run)} (tensorboard --logdir {run})")
    if len(args.run_dirs) > 1:
        png = plot_compare(args.run_dirs, args.out or args.run_dirs[0])
        print(f"wrote {png} (the runs overlaid)")
    return 0


# --------------------------------------------------------------------------- prepare, tokenizer, eval


def cmd_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.prepare import DEFAULT_SHARD_TOKENS, prepare, verify

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
            "warning: the validation split is empty (too few documents); raise --val-ratio, "
            "give more documents or split text files with --doc-separator",
            file=sys.stderr,
        )
    print(f"train on it: gptlab train --data {args.out}")
    return 0


class PrepareView:
    """Renders prepare events: a byte-based progress bar with tokens/s."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.t0 = time.perf_counter()
        self.tokens0 = 0

    def __call__(self, r: dict[str, Any]) -> None:
        ev = r["event"]
        if ev == "chars":
            print(f"char tokenizer: {r['n_chars']} characters found", flush=True)
        elif ev == "start":
            if r["resumed"]:
                print(f"continuing an interrupted preparation ({r['tokens']:,} tokens done)")
            print(
                f"tokenizing with {r['workers']} worker(s): vocabulary {r['n_vocab']:,}, "
                f"shards of {r['dtype']}",
                flush=True,
            )
            self.tokens0 = r["tokens"]
            if not self.quiet:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=r["total_bytes"] or None,
                    initial=r["done_bytes"],
                    unit="B",
                    unit_scale=True,
                    dynamic_ncols=True,
                )
        elif ev == "progress" and self.bar is not None:
            self.bar.n = r["done_bytes"]
            rate = (r["tokens"] - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{r['tokens']:,} tokens | {r['documents']:,} docs | {rate:,.0f} tok/s",
                refresh=True,
            )
        elif ev == "finished_already":
            print("already prepared: nothing to do")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_tokenizer_train(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.bpe import train_bpe
    from gptlab.prepare import iter_texts

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


def _run_meta(path: str) -> dict[str, Any]:
    from gptlab import checkpoint as ckpt_lib

    return ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(path))


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from gptlab.config import RunConfig
    from gptlab.data import (
        is_prepared,
        load_corpus,
        open_split,
        read_documents,
        read_manifest,
        tokenize_documents,
    )
    from gptlab.evaluate import evaluate_tokens
    from gptlab.tokenizer import token_byte_lengths
    from gptlab.trainer import autocast, keep_freed_host_memory

    if args.batch_size < 1:
        raise GptlabError("--batch-size must be 1 or more")
    if args.max_batches is not None and args.max_batches < 1:
        raise GptlabError("--max-batches must be 1 or more")
    if args.precision not in ("fp32", "bf16", "fp16"):
        raise GptlabError(f"--precision must be fp32, bf16 or fp16, got {args.precision!r}")
    model, tokenizer, device = load_run_model(args.checkpoint, args.device)
    if device.type == "cpu":
        # each batch's (B, T, V) logits would be page-faulted in afresh: 1.7x faster kept
        keep_freed_host_memory()
    cfg = RunConfig.from_dict(_run_meta(args.checkpoint)["config"])
    source = args.data or cfg.data.source
    if is_prepared(source):
        manifest = read_manifest(source)
        if manifest["tokenizer"] != tokenizer.identity():
            raise GptlabError(
                f"{source!r} was prepared with another tokenizer than this run's; prepare it "
                f"with the run's tokenizer (gptlab prepare ... --tokenizer) or give text"
            )
        tokens, what = open_split(source, args.split, manifest), f"{source} ({args.split} split)"
    elif args.data:
        docs = read_documents(source)
        tokens, what = tokenize_documents(docs, tokenizer, tokenizer.identity()), f"{source} (all)"
    else:
        corpus = load_corpus(
            source, cfg.data.tokenizer, cfg.data.train_ratio, tokenizer, cfg.data.split
        )
        tokens = corpus.val if args.split == "val" else corpus.train
        what = f"{source} (the run's {args.split} split)"
    T = cfg.model.context_length
    if len(tokens) < T + 1:
        raise GptlabError(
            f"{what} has {len(tokens)} tokens, fewer than one window ({T + 1}); give more text"
        )
    with autocast(device, args.precision):
        r = evaluate_tokens(
            model,
            tokens,
            T,
            args.batch_size,
            device,
            token_byte_lengths(tokenizer),
            args.max_batches,
        )
    r = {"data": what, "checkpoint": args.checkpoint, **r}
    if args.json:
        print(json.dumps(r))
    else:
        print(f"data: {what}: {r['tokens']:,} tokens in {r['windows']:,} windows of {T}")
        print(
            f"loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | "
            f"bits per byte {r['bits_per_byte']:.4f} ({r['bytes']:,} bytes)"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
