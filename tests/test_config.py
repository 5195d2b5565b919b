"""gptlab.config (fields, schema) and gptlab.recipes.presets: field metadata as the one
source of help, choices and ranges; value conversion; TOML rendering that reads back
identically; the presets' recipes."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from gptlab.config import fields as F
from gptlab.config import schema as C
from gptlab.errors import GptlabError
from gptlab.recipes import presets as P

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FIELDS = [(section, f) for section, cls in C.SECTION_TYPES.items() for f in dataclasses.fields(cls)]
IDS = [f"{s}.{f.name}" for s, f in FIELDS]


def test_section_types_match_runconfig():
    assert list(C.SECTION_TYPES) == list(C.SECTIONS)
    assert {f.name: f.default_factory for f in dataclasses.fields(C.RunConfig)} == C.SECTION_TYPES


@pytest.mark.parametrize("section, f", FIELDS, ids=IDS)
def test_every_field_has_one_line_of_help_and_a_valid_default(section, f):
    text = F.field_help(f)
    assert text and "\n" not in text
    choices, bounds = F.field_choices(f), F.field_range(f)
    if choices is not None:
        assert f.default in choices
    if bounds is not None:
        assert isinstance(f.default, int | float) and f.default in bounds


@pytest.mark.parametrize(
    "section, f",
    [(s, f) for s, f in FIELDS if F.field_choices(f)],
    ids=lambda x: getattr(x, "name", x),
)
def test_validate_reads_choices_from_metadata(section, f):
    for choice in F.field_choices(f):
        cfg = C.RunConfig()
        cfg.train.max_time = 60.0  # train.budget = time needs its budget
        setattr(getattr(cfg, section), f.name, choice)
        cfg.validate()
    cfg = C.RunConfig()
    setattr(getattr(cfg, section), f.name, "nonsense")
    with pytest.raises(GptlabError, match=f"{section}.{f.name} must be one of"):
        cfg.validate()


@pytest.mark.parametrize(
    "section, f",
    [(s, f) for s, f in FIELDS if F.field_range(f)],
    ids=lambda x: getattr(x, "name", x),
)
def test_validate_reads_ranges_from_metadata(section, f):
    bounds = F.field_range(f)
    bad = bounds.low if bounds.low_open else bounds.low - 1  # just outside the lower bound
    cfg = C.RunConfig()
    setattr(getattr(cfg, section), f.name, type(f.default)(bad))
    with pytest.raises(
        GptlabError, match=re.escape(f"{section}.{f.name} must be {bounds.describe()}")
    ):
        cfg.validate()


@pytest.mark.parametrize(
    "bounds, inside, outside, text",
    [
        (F.POSITIVE, [1e-9, 5], [0, -1], "greater than 0"),
        (F.NON_NEGATIVE, [0, 3.5], [-1e-9], "0 or more"),
        (F.FRACTION, [0, 1], [-0.1, 1.01], "in [0, 1]"),
        (F.BELOW_ONE, [0, 0.999], [1, -0.1], "in [0, 1)"),
        (F.Range(0, 1, low_open=True), [1, 0.5], [0, 1.5], "in (0, 1]"),
        (F.Range(high=10, high_open=True), [-5, 9], [10], "less than 10"),
    ],
)
def test_range(bounds, inside, outside, text):
    assert all(v in bounds for v in inside)
    assert not any(v in bounds for v in outside)
    assert bounds.describe() == text


@pytest.mark.parametrize("value", ["1e3", "2.5", " 7.0 ", 1000.0, 2.5])
def test_integer_field_refuses_non_integers(value):
    with pytest.raises(GptlabError, match="model.emb_dim must be an integer, got"):
        C.set_field(C.RunConfig(), "model.emb_dim", value)


@pytest.mark.parametrize("value", ["two", "", "1x"])
def test_integer_field_refuses_text(value):
    with pytest.raises(GptlabError, match="model.n_layers must be an integer number"):
        C.set_field(C.RunConfig(), "model.n_layers", value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_float_field_refuses_non_finite(value):
    with pytest.raises(GptlabError, match="train.max_time must be a finite number"):
        C.set_field(C.RunConfig(), "train.max_time", value)


def test_values_convert_to_the_field_type():
    cfg = C.RunConfig()
    C.set_field(cfg, "model.n_layers", " 3 ")
    C.set_field(cfg, "train.lr", "3e-4")
    C.set_field(cfg, "train.max_time", 60)  # a TOML integer for a float field
    C.set_field(cfg, "model.qkv_bias", "yes")
    assert (cfg.model.n_layers, cfg.train.lr, cfg.model.qkv_bias) == (3, 3e-4, True)
    assert isinstance(cfg.train.max_time, float) and cfg.train.max_time == 60.0


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_to_toml_reads_back_identically(name):
    cfg = P.preset(name).validate()
    cfg.train.start_context = 'quotes " and \\ and\ttabs'
    doc = tomllib.loads(C.to_toml(cfg, name))
    assert doc.pop("preset") == name
    assert C.RunConfig.from_dict(doc) == cfg
    assert "preset" not in tomllib.loads(C.to_toml(cfg))


def test_the_gpu_preset_is_the_cpu_recipe_at_gpt2_smalls_scale():
    cpu, gpu, small = P.preset("cpu"), P.preset("gpu"), P.preset("gpt2-small")
    shape = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    assert all(getattr(gpu.model, k) == getattr(small.model, k) for k in shape)
    recipe = set(P.MODERN_BLOCKS) | {"tie_weights", "init", "drop_rate", "vocab_multiple"}
    assert {k: getattr(gpu.model, k) for k in recipe} == {k: getattr(cpu.model, k) for k in recipe}
    assert (gpu.train.optimizer, gpu.train.muon_lr) == (cpu.train.optimizer, cpu.train.muon_lr)
    micro = gpu.train.batch_size * gpu.model.context_length
    assert gpu.train.batch_tokens % micro == 0 and gpu.train.batch_tokens >= 2**19


def test_runtime_settings_moved_out_of_train_are_named_and_migrated(tmp_path, capsys):
    """device, precision, compile, the kernels, host memory and the processes moved from
    train to their own section, runtime: the old name says the new one in one line (flag,
    override, config file); a config saved before the move loads with them moved, and a
    resume of such a run sees no change."""
    from gptlab.cli.main import main
    from gptlab.config.schema import MOVED, apply_nested, set_field
    from gptlab.recipes.presets import preset
    from gptlab.train.resume import config_changes, with_defaults

    assert MOVED["train.precision"] == "runtime.precision"
    for set_it in (
        lambda cfg: set_field(cfg, "train.precision", "fp32"),
        lambda cfg: apply_nested(cfg, {"train": {"precision": "fp32"}}, origin="config file c"),
    ):
        with pytest.raises(GptlabError, match="train.precision is now runtime.precision") as e:
            set_it(C.RunConfig())
        assert len(str(e.value).splitlines()) == 1
    code = main(
        ["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--train.device", "cpu"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--runtime.device" in err
    today = preset("walkthrough")
    saved = today.to_dict()
    runtime = saved.pop("runtime")
    old = {**saved, "train": {**saved["train"], **runtime}}  # the shape saved before the move
    assert "runtime" not in old and old["train"]["precision"] == "fp32"
    assert C.RunConfig.from_dict(old) == today
    assert config_changes(with_defaults(old), today.to_dict()) == []
