"""The discoverable command line: --help generated from the config dataclasses, `gptlab
config` and its round trip through --config, --version, and range-checked flags."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from test_cli import assert_user_error, resolve_cli, run_cli

import gptlab
from gptlab.cli import main as cli
from gptlab.cli.args import config_overrides
from gptlab.cli.run import FIELD_ALIASES
from gptlab.config import fields as F
from gptlab.config import schema as C
from gptlab.recipes import presets as P


def _help(capsys, monkeypatch, *argv: str) -> str:
    """The help of `gptlab argv --help` on one line (wide, so no word is broken)."""
    monkeypatch.setenv("COLUMNS", "1000")
    rc, out, err = run_cli(capsys, *argv, "--help")
    assert rc == 0 and err == ""
    return " ".join(out.split())


def _entry(text: str, flag: str) -> str:
    """The help entry of flag: from its listing up to the next flag."""
    start = text.rindex(f"{flag} ")
    end = text.find(" --", start + len(flag))
    return text[start : end if end > 0 else None]


@pytest.mark.parametrize("command", ["train", "config"])
def test_help_lists_every_config_field_with_its_default_and_choices(command, capsys, monkeypatch):
    text = _help(capsys, monkeypatch, command)
    for section, cls in C.SECTION_TYPES.items():
        assert f"{section} settings" in text
        for f in dataclasses.fields(cls):
            entry = _entry(text, f"--{section}.{f.name}")
            assert F.field_help(f) in entry, entry
            assert f"default: {json.dumps(f.default)}" in entry, entry
            choices = F.field_choices(f)
            if choices:
                assert "{" + ",".join(choices) + "}" in entry, entry


def test_help_shows_the_default_presets_value_where_it_differs(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "train")
    cpu = P.preset(P.DEFAULT_PRESET)
    assert cpu.model.n_layers != C.ModelConfig().n_layers
    entry = _entry(text, "--model.n_layers")
    assert f"{P.DEFAULT_PRESET} preset: {cpu.model.n_layers}" in entry


def test_enum_short_flags_show_their_choices(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "train")
    for flag, (key, _) in FIELD_ALIASES.items():
        section, name = key.split(".")
        f = next(f for f in dataclasses.fields(C.SECTION_TYPES[section]) if f.name == name)
        if F.field_choices(f):
            assert f"{flag} {{{','.join(F.field_choices(f))}}}" in text, flag
    assert "--precision {fp32,bf16,fp16}" in _help(capsys, monkeypatch, "eval")


@pytest.mark.parametrize("argv", [[], ["convert"], ["tokenizer"]], ids=["gptlab", "convert", "tok"])
def test_missing_command_prints_help_on_stdout_and_exits_2(argv, capsys):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert out.startswith("usage: gptlab") and err == ""


def test_version(capsys):
    rc, out, err = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"gptlab {gptlab.__version__}"


# --------------------------------------------------------------------------- gptlab config


def _config_of(*argv: str) -> C.RunConfig:
    """The RunConfig `gptlab train argv` would run with (parsed by the real parser)."""
    return resolve_cli("train", *argv).config


ROUND_TRIPS = {
    "default": [],
    "tiny with overrides": [
        "--preset",
        "tiny",
        "--data",
        "my corpus.txt",
        "--model.n_layers=3",
        "--train.lr",
        "3e-4",
        "--max-steps",
        "9",
        "--precision",
        "bf16",
        "--data.tokenizer",
        "char",
        "--train.start_context",
        'He said "hi"\tthen',
    ],
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_config_toml_round_trips_through_config_flag(case, tmp_path, capsys):
    argv = ROUND_TRIPS[case]
    rc, printed, err = run_cli(capsys, "config", *argv)
    assert rc == 0, err
    expected = _config_of(*argv)
    saved = tmp_path / "run.toml"
    saved.write_text(printed)
    assert _config_of("--config", str(saved)) == expected
    rc, again, err = run_cli(capsys, "config", "--config", saved)
    assert rc == 0 and again == printed  # a fixed point
    name = "tiny" if case != "default" else P.DEFAULT_PRESET
    assert f'preset = "{name}"' in printed
    if case != "default":
        assert expected.model.n_layers == 3 and expected.train.lr == 3e-4
        assert expected.train.max_steps == 9 and expected.runtime.precision == "bf16"


def test_config_validates(capsys):
    rc, out, err = run_cli(capsys, "config", "--model.n_heads", "5")
    assert_user_error(rc, out, err, "divisible")
    assert out == ""


@pytest.mark.parametrize("value", ["1e3", "2.5", "4.0"])
def test_integer_field_given_a_non_integer_says_so(value, capsys):
    rc, out, err = run_cli(capsys, "config", "--model.emb_dim", value)
    assert_user_error(rc, out, err, f"model.emb_dim must be an integer, got '{value}'")


def test_integer_field_given_a_toml_float_says_so(tmp_path, capsys):
    path = tmp_path / "f.toml"
    path.write_text("[model]\nemb_dim = 1e3\n")
    rc, out, err = run_cli(capsys, "config", "--config", path)
    assert_user_error(rc, out, err, "model.emb_dim must be an integer, got 1000.0")


def test_preset_flag_disagreeing_with_the_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "f.toml"
    path.write_text('preset = "tiny"\n[train]\nlr = 0.01\n')
    rc, out, err = run_cli(capsys, "config", "--config", path, "--preset", "cpu")
    assert_user_error(rc, out, err, "--preset cpu", "'tiny'", str(path))
    # the same preset in both places is no conflict
    assert _config_of("--config", str(path), "--preset", "tiny") == _config_of(
        "--preset", "tiny", "--train.lr", "0.01"
    )


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("form", [["--model.n_layers=4"], ["--model.n_layers", "4"]])
def test_override_with_equals_or_space(form):
    args = cli.build_parser().parse_args(["train", "--preset", "tiny", *form])
    assert config_overrides(args) == [("model.n_layers", "4")]
    r = resolve_cli("train", "--preset", "tiny", *form)
    assert r.config.model.n_layers == 4 and r.name == "tiny"


def test_overrides_apply_in_the_order_given():
    argv = ["train", "--train.lr", "1e-3", "--precision", "bf16", "--train.lr", "2e-3"]
    args = cli.build_parser().parse_args(argv)
    assert config_overrides(args) == [
        ("train.lr", "1e-3"),
        ("runtime.precision", "bf16"),
        ("train.lr", "2e-3"),
    ]
    cfg = resolve_cli(*argv).config
    assert cfg.train.lr == 2e-3 and cfg.runtime.precision == "bf16"


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--model.n_layer", ["'--model.n_layer'", "--model.n_layers"]),
        ("--trian.lr", ["'--trian.lr'", "--train.lr"]),
        ("--max-step", ["'--max-step'", "--max-steps"]),  # never abbreviated to --max-steps
        ("--pre", ["'--pre'"]),
    ],
)
def test_typo_is_an_error_naming_the_flag(flag, words, capsys):
    rc, out, err = run_cli(capsys, "config", flag, "4")
    assert_user_error(rc, out, err, *words)


# --------------------------------------------------------------------------- numeric flags

BAD_NUMBERS = {
    "generate": (
        [],
        [
            ("--max-new-tokens", "-1", "0 or more"),
            ("--max-new-tokens", "1e3", "integer"),
            ("--temperature", "-0.5", "0 or more"),
            ("--temperature", "nan", "0 or more"),
            ("--top-k", "-1", "0 or more"),
            ("--top-p", "0", "(0, 1]"),
            ("--top-p", "1.5", "(0, 1]"),
            ("--seed", "-1", "[0, "),
            ("--seed", "abc", "integer"),
        ],
    ),
    "eval": (
        [],
        [
            ("--batch-size", "0", "1 or more"),
            ("--max-batches", "0", "1 or more"),
            ("--max-batches", "2.5", "integer"),
        ],
    ),
    "prepare": (
        ["in.txt", "--out", "out"],
        [
            ("--val-ratio", "1", "[0, 1)"),
            ("--val-ratio", "-0.1", "[0, 1)"),
            ("--seed", "-5", "[0, "),
            ("--workers", "0", "1 or more"),
            ("--shard-tokens", "0", "1 or more"),
        ],
    ),
    "tokenizer train": (
        ["--data", "in.txt", "--out", "tok"],
        [
            ("--vocab-size", "100", "258 or more"),
            ("--vocab-size", "1e4", "integer"),
            ("--min-frequency", "0", "1 or more"),
        ],
    ),
    "train": (
        [],
        [
            ("--epochs", "0", "1 or more"),
            ("--max-steps", "-3", "1 or more"),
            ("--max-time", "0", "greater than 0"),
            ("--max-time", "inf", "greater than 0"),
            ("--checkpoint-every", "-1", "0 or more"),
            ("--checkpoint-every-minutes", "-2", "0 or more"),
            ("--keep-last", "0", "greater than 0"),
        ],
    ),
}
CASES = [
    (command, flag, value, words)
    for command, (_, rows) in BAD_NUMBERS.items()
    for flag, value, words in rows
]


@pytest.mark.parametrize("command, flag, value, rng", CASES, ids=[" ".join(c[:3]) for c in CASES])
def test_bad_numeric_flag_is_one_line_naming_flag_and_range(command, flag, value, rng, capsys):
    extra = BAD_NUMBERS[command][0]
    rc, out, err = run_cli(capsys, *command.split(), *extra, flag, value)
    assert_user_error(rc, out, err, f"{flag}:", rng, repr(value))


def test_top_k_zero_means_no_cut_and_is_accepted():
    args = cli.build_parser().parse_args(["generate", "--top-k", "0", "--top-p", "1"])
    assert args.top_k == 0 and args.top_p == 1.0


# --------------------------------------------------------------------------- cheap help


def test_help_and_config_do_not_import_torch():
    code = (
        "import sys\n"
        "from gptlab.cli import main as cli\n"
        "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['--version']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "cli.main(['config', '--preset', 'tiny'])\n"
        "print([m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
