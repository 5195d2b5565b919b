"""The grammar the commands share: one-line usage errors, range-checked numbers, --threads,
and the config fields as --section.field VALUE flags recorded in the order given. It imports
only the standard library, gptlab.config, gptlab.recipes.presets and gptlab.errors, so that
`gptlab --help` answers without loading torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from gptlab.config import fields as F
from gptlab.config import schema as C
from gptlab.errors import GptlabError
from gptlab.recipes import presets as P


class Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one-line GptlabErrors, like every other user error.
    Flags are never abbreviated: a typo must not silently become another flag."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = message.removeprefix("argument ")
        flag, _, problem = message.partition(": ")
        if problem == "expected one argument":
            message = f"{flag} needs a value"
        raise GptlabError(f"{message}; see `{self.prog} --help`")


def number(kind: type, bounds: F.Range, note: str = "", keep_text: bool = False) -> Callable:
    """An argparse `type`: text -> kind (int or float) within bounds, else an error naming the
    range. keep_text returns the text itself (a config override, converted later)."""
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


AT_LEAST_ONE = F.Range(1)
SEED = F.Range(0, 2**64 - 1)  # what torch.Generator.manual_seed accepts


def command(sub, name: str, func: Callable, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser that runs func(args) and knows itself (for error hints)."""
    c = sub.add_parser(name, **kwargs)
    c.set_defaults(func=func, command_parser=c)
    return c


def threads_arg(p: argparse.ArgumentParser, serve: bool = False) -> None:
    """--threads N (gptlab.train.resolve.apply_threads); `serve` adds what a server keeps."""
    extra = "; the engine's threads and the HTTP loop never share a core" if serve else ""
    p.add_argument(
        "--threads",
        type=number(int, F.NON_NEGATIVE),
        default=0,
        metavar="N",
        help="CPU threads for torch; 0 (default): the cores this process may use, fewer "
        f"when other programs are running now (gptlab.runtime.threads){extra}",
    )


class Override(argparse.Action):
    """Records `--section.field VALUE` (or a flag standing for one field, like --precision)
    as (dotted key, text) in the order given; see config_overrides()."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace._config_overrides = [*config_overrides(namespace), (self.key, values)]


def config_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The config fields set on the command line, as (dotted key, text) in the order given."""
    return list(getattr(args, "_config_overrides", []))


def config_field_args(p: argparse.ArgumentParser) -> None:
    """Every config field as --section.field VALUE, one group per section, help from its field."""
    base = P.preset(P.DEFAULT_PRESET)
    for section, cls in C.SECTION_TYPES.items():
        group = p.add_argument_group(
            f"{section} settings (the [{section}] table of a --config file)",
            f"{cls.__doc__.splitlines()[0]} Default: every preset's starting value; "
            f"'{P.DEFAULT_PRESET} preset': what the default preset changes it to.",
        )
        for f in dataclasses.fields(cls):
            default = json.dumps(f.default)
            preset_value = getattr(getattr(base, section), f.name)
            if preset_value != f.default:
                default += f"; {P.DEFAULT_PRESET} preset: {json.dumps(preset_value)}"
            field_flag(
                group, f"--{section}.{f.name}", f"{section}.{f.name}", f, f"default: {default}"
            )


def field_flag(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    key: str,
    f: dataclasses.Field,
    note: str,
    metavar: str | None = None,
    bounds: F.Range | None = None,
) -> None:
    """`flag VALUE` sets the config field `key` (the dataclass field f) as an Override; its help
    is the field's own with `note`; `bounds` checks a number at once."""
    p.add_argument(
        flag,
        action=Override,
        key=key,
        dest=key,
        default=argparse.SUPPRESS,
        metavar=metavar or field_metavar(f),
        type=number(type(f.default), bounds, keep_text=True) if bounds else None,
        help=f"{F.field_help(f)} ({note})".replace("%", "%%"),  # argparse formats help with %
    )


def field_metavar(f: dataclasses.Field) -> str:
    """A flag's placeholder: the field's choices, or its type."""
    choices = F.field_choices(f)
    if choices:
        return "{" + ",".join(choices) + "}"
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(f.default), "TEXT")
