"""`gptlab <command>`: the only code that reads argv, prints for the user or exits.

Each command turns its arguments into one library call and its result into a few lines:
gptlab.cli.run holds train, finetune and config, gptlab.cli.tools prepare, tokenizer, convert
and plot, this module the table of commands, generate, eval and serve. A user mistake
(GptlabError) prints one line on stderr and exits with status 2; help goes to stdout. Nothing
imports torch at the top, so `gptlab --help` and `gptlab <cmd> --help` answer without it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterable, Iterator
from itertools import chain

from gptlab.cli.args import AT_LEAST_ONE, SEED, Parser, command, number, threads_arg
from gptlab.cli.run import config_parser, finetune_parser, train_parser
from gptlab.cli.tools import convert_parser, plot_parser, prepare_parser, tokenizer_parser
from gptlab.config import fields as F
from gptlab.config import schema as C
from gptlab.errors import GptlabError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
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


def _unknown_argument(arg: str, args: argparse.Namespace) -> str:
    """The one-line error for the first argument no option of the command took."""
    sub = getattr(args, "command_parser", None)
    prog = sub.prog if sub is not None else "gptlab"
    name = arg.split("=", 1)[0]
    if not name.startswith("-"):
        return f"unexpected argument {arg!r} for `{prog}`; see `{prog} --help`"
    if name[2:] in C.REMOVED:  # a config option that was removed: say so, and what to do
        return C.REMOVED[name[2:]]
    if name[2:] in C.MOVED:  # a config option that moved to another section: name it
        new = C.MOVED[name[2:]]
        return f"{name} is now --{new} (how a run executes has its own section, runtime)"
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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand a job, each running its cmd_* function."""
    from gptlab import __version__

    p = Parser(prog="gptlab", description="Pretrain GPT-style language models from scratch.")
    p.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        train_parser,
        finetune_parser,
        config_parser,
        _generate_parser,
        convert_parser,
        plot_parser,
        prepare_parser,
        tokenizer_parser,
        _eval_parser,
        _serve_parser,
    ):
        add(sub)
    return p


def _apply_threads(args: argparse.Namespace, reserve: int = 0) -> str | None:
    """Set torch's threads by --threads (gptlab.runtime.threads); the note saying why it chose
    fewer, or None (printed once the command is under way: an error stays one line on stderr)."""
    from gptlab.runtime.threads import apply_threads

    note = apply_threads(args.threads, reserve=reserve)
    return f"gptlab: note: {note}" if note else None


def _print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)


def _generate_parser(sub) -> None:
    g = command(sub, "generate", cmd_generate, help="continue a prompt with a trained model")
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
    g.add_argument("--max-new-tokens", type=number(int, F.NON_NEGATIVE), default=100, metavar="N")
    g.add_argument(
        "--temperature",
        type=number(float, F.NON_NEGATIVE),
        default=0.8,
        help="0 for greedy decoding (default: 0.8)",
    )
    g.add_argument(
        "--top-k",
        type=number(int, F.NON_NEGATIVE, " (0: no top-k cut)"),
        default=50,
        metavar="K",
        help="sample among the K likeliest tokens; 0: all (default: 50)",
    )
    g.add_argument(
        "--top-p",
        type=number(float, F.Range(0, 1, low_open=True)),
        metavar="P",
        help="sample among the likeliest tokens whose probability reaches P (default: off)",
    )
    g.add_argument("--seed", type=number(int, SEED))
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    g.add_argument(
        "--chat",
        action="store_true",
        help="chat: each --prompt (or each line of stdin; typed at a terminal) is a user turn, "
        "the history re-rendered each turn by the run's chat template (a base model: the "
        "plays-style USER:/ASSISTANT: template)",
    )
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message")
    g.add_argument(
        "--no-cache", action="store_true", help="recompute the whole window at every step"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the cached step with a static cache (CUDA: CUDA graphs; slow first call)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    threads_arg(g)


def _eval_parser(sub) -> None:
    ev = command(
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
    ev.add_argument("--batch-size", type=number(int, AT_LEAST_ONE), default=8)
    ev.add_argument(
        "--max-batches", type=number(int, AT_LEAST_ONE), help="stop after this many batches"
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
    tk.add_argument("--num-fewshot", type=number(int, F.Range(0)), default=0, metavar="K")
    tk.add_argument(
        "--limit", type=number(int, AT_LEAST_ONE), metavar="N",
        help="score only the first N items of each task",
    )  # fmt: skip
    tk.add_argument("--out", metavar="REPORT.json", help="write the report here when complete")
    threads_arg(ev)


def _serve_parser(sub) -> None:
    s = command(
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
        type=number(int, F.Range(0, 65535)),
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
        type=number(int, F.Range(1, 1024)),
        default=16,
        metavar="N",
        help="sequences decoded at once; more requests wait their turn (default: 16)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    s.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow first requests)"
    )
    threads_arg(s, serve=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from gptlab.infer.engine import Engine
    from gptlab.interop.runs import open_run

    if args.system is not None and not args.chat:
        raise GptlabError("--system needs --chat")
    prompts = args.prompt or ["Every effort moves you"]
    note = _apply_threads(args)
    run = open_run(args.checkpoint, args.device)
    engine = Engine.for_run(run, "generate", use_cache=not args.no_cache, compile=args.compile)
    if args.chat:
        _print_note(note)
        return _chat(args, run, engine)
    if not all(run.tokenizer.encode(prompt) for prompt in prompts):
        raise GptlabError("--prompt is empty; give some text to continue")
    _print_note(note)
    if len(prompts) == 1:
        _stream([prompts[0]], engine.stream(prompts[0], _sampling(args)))
        return 0
    texts = engine.complete(prompts, _sampling(args))
    for n, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        print(("\n" if n else "") + f"[{n + 1}] {prompt}{text}")
    return 0


def _sampling(args: argparse.Namespace):
    from gptlab.infer.engine import Sampling

    return Sampling(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _stream(*parts: Iterable[str]) -> None:
    """Write each piece as it arrives, then end the line."""
    for piece in chain(*parts, ["\n"]):
        sys.stdout.write(piece)
        sys.stdout.flush()


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


def _chat(args: argparse.Namespace, run, engine) -> int:
    """`generate --chat`: each reply streamed on its own line."""
    from gptlab.infer.chat import Conversation

    chat = Conversation(engine, run.chat_template, args.system, _sampling(args))
    for user in _user_turns(args):
        if not user.strip():
            if args.prompt:
                raise GptlabError("--prompt is empty; give some text to say")
            continue
        _stream(chat.reply(user))
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
    finetuned = is_finetuned(run.config)
    if finetuned:
        r = evaluate_finetuned(run, args.data, args.split, args.batch_size)
    else:
        r = evaluate_run(
            run, args.data, args.split, args.batch_size, args.max_batches, args.precision
        )
        _print_note(note)
    r = {"data": r["data"], "checkpoint": args.checkpoint, **r}
    if args.json:
        print(json.dumps(r))
    elif finetuned:
        print(f"data: {r['data']}: {r['examples']:,} {r['format']} records")
        line = f"loss {r['loss']:.4f} on the learned tokens"
        if "accuracy" in r:
            line += f" | accuracy {100 * r['accuracy']:.2f}%"
        print(line)
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
    from gptlab.infer.serve import serve
    from gptlab.interop.runs import open_run

    note = _apply_threads(args, reserve=1)  # a core for the HTTP loop beside the engine's
    run = open_run(args.checkpoint, args.device)

    def ready(url: str) -> None:
        _print_note(note)
        key = " (API key required)" if args.api_key else ""
        print(f"serving {args.checkpoint} at {url}{key}: page at /, OpenAI API at /v1", flush=True)

    serve(
        run, args.host, args.port, args.api_key, args.max_batch, args.precision, ready, args.compile
    )
    return 0


def lm_eval_main() -> int:
    """`gptlab-lm-eval`: lm-evaluation-harness's own command line with the model `gptlab`
    registered first (lm-eval 0.4.x loads no plugins, so `lm_eval --model gptlab` cannot)."""
    try:
        import lm_eval.__main__ as lm_eval_cli

        import gptlab.evals.harness  # noqa: F401  registers --model gptlab
    except ModuleNotFoundError as e:
        name = "lm-evaluation-harness (lm_eval)" if (e.name or "").startswith("lm_eval") else e.name
        print(
            f"gptlab-lm-eval: error: {name} is not installed; pip install 'gptlab[eval]'",
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
