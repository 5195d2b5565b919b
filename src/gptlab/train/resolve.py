"""One resolution for a run: what the user asked for -> the RunConfig it runs with.

The commands (`gptlab train`, `finetune`, `config`) and the Python calls (`train()`,
`finetune()`) all resolve through `resolve()`, so the same settings make the same run:

1. the base: a RunConfig passed in; else, resuming without a preset or config file, the
   run's saved config.json; else the preset (default `cpu`; a finetune: FINETUNE_TRAIN,
   its model from init_from) with the TOML config file over it;
2. `data`, then the limits (any of epochs, max_steps, max_time replaces all three; a step
   count sets train.budget = steps), the dotted overrides in order, the trackers; validated;
3. a new train run (not resumed, not from init_from) with train.sizing = corpus and
   train.budget = time: the CHOSEN fields the user did not give are chosen from the text's
   size and the budget (gptlab.recipes.sizing) at this machine's measured speed.

"Given" (kept by sizing): the overrides' keys, the limits when any is set, and the config
file's keys. A RunConfig passed in counts as setting every field: sizing never changes it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gptlab.config.schema import RunConfig, apply_nested, load_toml, set_field, tracker_names
from gptlab.errors import GptlabError
from gptlab.recipes import presets, sizing
from gptlab.runtime.threads import apply_threads

LIMITS = ("epochs", "max_steps", "max_time")


@dataclasses.dataclass
class Resolved:
    """A resolved run: its validated `config` (a finetune's: all but the model); its `name`
    (the preset's, "resumed", "run" or "finetune"); the `sizing` line; the thread policy's
    `threads_note`; the `model_keys` the user set (checked against init_from's model)."""

    config: RunConfig
    name: str
    sizing: str | None = None
    threads_note: str | None = None
    model_keys: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The "resolved" event that train() and finetune() send to on_event first."""
        return {
            "event": "resolved",
            "preset": self.name,
            "sizing": self.sizing,
            "threads_note": self.threads_note,
        }


def resolve(
    config: RunConfig | None = None,
    *,
    finetune: bool = False,
    preset: str | None = None,
    config_file: str | Path | None = None,
    data: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    trackers: Iterable[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    init_from: str | None = None,
    threads: int | None = None,
) -> Resolved:
    """The run these settings describe (module docstring), a finetune's with `finetune`.
    `overrides` maps dotted keys to values (text or typed); `trackers` join train.trackers.
    `threads`: None leaves torch's as they are, 0 applies gptlab.runtime.threads' policy, N
    uses N. Errors are one-line GptlabErrors; `config` is not changed."""
    if finetune and preset:
        raise GptlabError(
            "gptlab finetune takes its model from --init-from; drop --preset (use --config for settings)"
        )
    note = None
    if threads is not None:  # first: sizing measures the speed on these threads
        note = apply_threads(threads, out if resume else None)
    pairs = list(overrides.items() if isinstance(overrides, Mapping) else overrides)
    file_cfg = load_toml(config_file) if config_file else {}
    cfg, name = _start(config, finetune, preset, config_file, dict(file_cfg), out, resume)
    if finetune and config is None and not data and not resume:
        raise GptlabError("gptlab finetune needs --data FILE.jsonl: the records to learn from")
    limits = dict(zip(LIMITS, (epochs, max_steps, max_time), strict=True))
    _apply(cfg, data, limits, pairs, trackers)
    model_keys = tuple(
        [k.split(".", 1)[1] for k, _ in pairs if k.startswith("model.")]
        + list(file_cfg.get("model", {}))
    )
    if finetune:  # the model comes from init_from: the checks across sections wait for it
        for section in ("train", "data", "finetune"):
            getattr(cfg, section).validate()
        _check_weights(finetune, init_from, resume)
        return Resolved(cfg, "finetune", None, note, model_keys)
    cfg.validate()
    _check_weights(finetune, init_from, resume)
    line = None
    fresh = config is None and not (resume or init_from)  # weights bring their own shape
    if fresh and cfg.train.sizing == "corpus" and cfg.train.budget == "time":
        line = size_to_corpus(cfg, _given(pairs, limits, file_cfg))
    return Resolved(cfg.validate(), name, line, note, model_keys)


def _check_weights(finetune: bool, init_from: str | None, resume: bool) -> None:
    what = "finetune" if finetune else "run"
    if init_from is not None and resume:
        raise GptlabError(
            f"--init-from starts a new {what} from other weights and --resume continues one; "
            "use one of them"
        )
    if finetune and init_from is None and not resume:
        raise GptlabError(
            "gptlab finetune needs --init-from SRC: the gptlab run or Hugging Face folder to start from"
        )


def _start(
    config: RunConfig | None,
    finetune: bool,
    preset: str | None,
    config_file: str | Path | None,
    file_cfg: dict,
    out: str | Path | None,
    resume: bool,
) -> tuple[RunConfig, str]:
    """The config resolution starts from, and its name (step 1)."""
    saved = Path(out) / "config.json" if out else None
    if config is not None:
        if preset or config_file:
            raise GptlabError("give a RunConfig or a preset and config file, not both")
        return copy.deepcopy(config), "run"
    if resume and saved and saved.is_file() and not (preset or config_file):
        return RunConfig.from_dict(json.loads(saved.read_text())), "resumed"
    file_preset = file_cfg.pop("preset", None)
    if finetune:
        cfg, name = RunConfig.from_dict({"train": dict(presets.FINETUNE_TRAIN)}), "finetune"
    else:
        if preset and file_preset is not None and preset != file_preset:
            raise GptlabError(
                f"--preset {preset} disagrees with preset = {file_preset!r} in {config_file}; "
                "drop one of them"
            )
        name = preset or file_preset or presets.DEFAULT_PRESET
        cfg = presets.preset(name)
    apply_nested(cfg, file_cfg, origin=f"config file {config_file}")
    return cfg, name


def _apply(
    cfg: RunConfig,
    data: str | None,
    limits: dict[str, Any],
    pairs: list[tuple[str, Any]],
    trackers: Iterable[str],
) -> None:
    if data:
        cfg.data.source = str(data)
    if any(v is not None for v in limits.values()):
        # Every limit is replaced: the ones not given are off. A step count makes the schedule
        # span steps; a time alone leaves the budget as it was.
        for key, value in limits.items():
            set_field(cfg, f"train.{key}", value or (0.0 if key == "max_time" else 0))
        if cfg.train.epochs or cfg.train.max_steps:
            cfg.train.budget = "steps"
    for key, value in pairs:
        set_field(cfg, key, value)
    added = list(trackers)
    if added:  # kept in train.trackers, so that a resume logs there too
        names = [*tracker_names(cfg.train.trackers), *added]
        cfg.train.trackers = ",".join(dict.fromkeys(names))


def _given(pairs: list[tuple[str, Any]], limits: dict[str, Any], file_cfg: dict) -> set[str]:
    keys = {k for k, _ in pairs}
    if any(v is not None for v in limits.values()):
        keys |= {f"train.{k}" for k in LIMITS}
    for section, values in file_cfg.items():
        if isinstance(values, dict):
            keys |= {f"{section}.{k}" for k in values}
    return keys


def size_to_corpus(cfg: RunConfig, given: set[str]) -> str | None:
    """Choose the CHOSEN fields not in `given` from the size of cfg's training text, in
    place; returns the line that says what was chosen (or why not), or None. The speed is
    train.sizing_speed, else measured (under torchrun: the anchor's, the same on every rank)."""
    try:
        total = sizing.corpus_bytes(cfg.data.source)
    except GptlabError:  # unreadable now: `gptlab config` still prints, training says why
        total = None
    if total is None:
        return (
            f"gptlab: sizing: the size of {cfg.data.source!r} is not known before it is read; "
            "the preset's shape and tokenizer are kept"
        )
    if given.issuperset(sizing.CHOSEN):  # a saved config, say: nothing left to choose
        return None
    speed_from = "given"
    if not cfg.train.sizing_speed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            speed, speed_from = sizing.ANCHOR_TOKENS_PER_S, "the anchor's, under torchrun"
        else:
            speed, speed_from = round(measure_speed(cfg), 1), "measured here"
        cfg.train.sizing_speed = speed
    choice = sizing.size_run(cfg, total * cfg.data.train_ratio, given, speed_from)
    return choice.line(tuple(k for k in sizing.CHOSEN if k in given))


def measure_speed(cfg: RunConfig, steps: int = 3) -> float:
    """Tokens/s of training steps of the anchor shape with `cfg`'s other settings, on its
    device and torch's current threads: one untimed step, then the mean of `steps` (eager).
    The global random stream is left as it was, so the run that follows is the same run."""
    import torch

    from gptlab.model.gpt import GPTModel
    from gptlab.model.loss import model_loss
    from gptlab.runtime.device import resolve_device, resolve_runtime, sync
    from gptlab.train.optim import build_optimizer

    layers, width, heads, context = sizing.RUNGS[sizing.ANCHOR_RUNG]
    probe = copy.deepcopy(cfg)
    m = probe.model
    m.n_layers, m.emb_dim, m.n_heads, m.context_length = layers, width, heads, context
    m.vocab_size, m.drop_rate, m.n_kv_heads, m.num_classes = 4096, 0.0, 0, 0
    device = resolve_device(probe.runtime.device)
    rt = resolve_runtime(probe.runtime, device)
    gen = torch.Generator().manual_seed(0)
    rows = probe.train.batch_size
    x = torch.randint(0, 4096, (rows, context + 1), generator=gen).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = GPTModel(m.validate()).to(device).train()
        optimizer = build_optimizer(model, probe.train, device, rt.muon_dtype)
        elapsed = 0.0
        for i in range(steps + 1):
            sync(device)
            t0 = time.perf_counter()
            with rt.autocast():
                loss = model_loss(model, x[:, :-1], x[:, 1:], chunked=rt.chunked_loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i:  # the first step allocates and warms the kernels up
                elapsed += time.perf_counter() - t0
    return steps * rows * context / elapsed
