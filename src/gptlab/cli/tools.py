"""The commands that turn files into files: `gptlab prepare`, `gptlab tokenizer train`,
`gptlab convert from-hf | to-hf | merge-lora` and `gptlab plot`: their flags, one library call
each, and what they wrote in a line or two."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptlab.cli.args import AT_LEAST_ONE, SEED, command, number
from gptlab.config import fields as F
from gptlab.errors import GptlabError


def _help_and_fail(parser: argparse.ArgumentParser) -> int:
    """A command group called without its subcommand: its help (on stdout), status 2."""
    parser.print_help()
    return 2


def _vocab_size(text: str) -> int:
    from gptlab.data.bpe import MIN_VOCAB  # the BPE's own floor, imported only when given

    return number(int, F.Range(MIN_VOCAB), " (256 bytes, the special token, a merge)")(text)


def convert_parser(sub) -> None:
    c = command(
        sub,
        "convert",
        None,
        help="convert GPT-2 and Llama weights to and from Hugging Face transformers' format",
    )
    c.set_defaults(func=lambda args: _help_and_fail(c))
    csub = c.add_subparsers(dest="direction", metavar="DIRECTION")
    fh = command(
        csub,
        "from-hf",
        cmd_convert_from_hf,
        help="a Hugging Face GPT-2 or Llama (directory or hub id) -> a gptlab run directory",
    )
    fh.add_argument("src", help="directory with config.json + model.safetensors, or a hub id")
    fh.add_argument("out_dir", help="new gptlab run directory")
    th = command(
        csub,
        "to-hf",
        cmd_convert_to_hf,
        help="a gptlab run -> a directory transformers' from_pretrained loads",
    )
    th.add_argument("run_dir", help="gptlab run or checkpoint directory")
    th.add_argument("out_dir", help="new directory for config.json, model.safetensors, ...")
    ml = command(
        csub,
        "merge-lora",
        cmd_convert_merge_lora,
        help="a LoRA finetune -> a plain gptlab run whose weights are base + adapters",
    )
    ml.add_argument("run_dir", help="a LoRA run (gptlab finetune --lora-rank R) or checkpoint")
    ml.add_argument("out_dir", help="new gptlab run directory")


def plot_parser(sub) -> None:
    pl = command(
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


def prepare_parser(sub) -> None:
    pr = command(
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
        type=number(float, F.BELOW_ONE),
        default=0.1,
        help="share of the text for validation, in pieces (default: 0.1)",
    )
    pr.add_argument(
        "--seed", type=number(int, SEED), default=1337, help="seed of the document split"
    )
    pr.add_argument(
        "--workers", type=number(int, AT_LEAST_ONE), help="tokenizer processes (default: all cores)"
    )
    pr.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed jsonl lines and records without the text field (counted)",
    )
    pr.add_argument(
        "--shard-tokens",
        type=number(int, AT_LEAST_ONE),
        help="tokens per shard file (default: 16,777,216)",
    )
    pr.add_argument(
        "--doc-separator",
        help="split .txt/.md files into documents at this text (e.g. '<|endoftext|>')",
    )
    pr.add_argument("--hf-split", default="train", help="split of hf:NAME datasets")
    pr.add_argument("--hf-config", help="configuration of hf:NAME datasets")
    pr.add_argument("--verify", action="store_true", help="re-check the shards of --out and exit")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")


def tokenizer_parser(sub) -> None:
    tk = command(sub, "tokenizer", None, help="train your own tokenizer")
    tk.set_defaults(func=lambda args: _help_and_fail(tk))
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    tt = command(
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
        type=number(int, AT_LEAST_ONE),
        default=2,
        help="least count of a merged pair (default: 2)",
    )
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--doc-separator")
    tt.add_argument("--skip-bad", action="store_true")


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
    from gptlab.observe import plot

    for run in args.run_dirs:
        try:
            png = plot.plot_run(run)
            print(f"wrote {png} and {png.with_suffix('.pdf')}")
        except plot.NoEvaluations as e:  # one run of several not evaluated yet: the others plot
            if len(args.run_dirs) == 1:
                raise
            print(f"{run}: no loss plot ({e})")
        for fn in (plot.plot_lr, plot.plot_throughput, plot.plot_tasks):
            png = fn(run)
            if png is not None:
                print(f"wrote {png}")
        if args.tensorboard:
            from gptlab.observe.trackers import write_run

            print(f"wrote TensorBoard events to {write_run(run)} (tensorboard --logdir {run})")
    if len(args.run_dirs) > 1:
        png = plot.plot_compare(args.run_dirs, args.out or args.run_dirs[0])
        print(f"wrote {png} (the runs overlaid)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data.prepare import DEFAULT_SHARD_TOKENS, prepare, verify
    from gptlab.observe.console import PrepareView

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
