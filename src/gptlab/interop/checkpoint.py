"""Complete, versioned, atomic checkpoints: a directory `RUN_DIR/checkpoints/step-NNNNNNNN/`
  model.safetensors   the weights (no wrapper prefixes; a tied matrix once); a LoRA run's:
                      only what trains, its base named in the config
  state.pt            optimizer, scaler, counters, RNG states, loss history (plain tensors
                      and containers: loaded with weights_only=True)
  meta.json           format version, step, config, tokenizer, data fingerprint, val loss
written into a temporary directory beside the final one, every file fsynced, renamed into
place, and the `latest` pointer replaced last: a crash or a full disk during a save leaves
the previous checkpoint whole and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from gptlab.atomic import fsync_dir, fsync_file, write_text
from gptlab.config.schema import RunConfig
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel
from gptlab.model.lora import trained_state_dict

FORMAT = "gptlab-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
# Weights written by other tools (Hugging Face, plain torch.save): named in the error when a
# directory holds them but no gptlab checkpoint.
FOREIGN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside torch.compile / DDP / FSDP wrappers (whose keys carry prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune all but the newest
    `keep_last` and the best val_loss; returns its directory. `model`: a module or tensors by
    key (a LoRA run's adapters); a refused write is a GptlabError, earlier ones untouched."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, step, model, meta, state)
        if final.exists():
            # Re-saving a step (a signal right after a periodic save): move the old copy aside
            # first, so a crash between the renames loses that copy, never half of one.
            old = final.with_name(f".old-{name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
        write_text(ckpt_root / "latest", name + "\n")
    except BaseException as e:
        # Whatever stopped the save (a full disk, a second Ctrl-C), the half-written
        # directory goes and the earlier checkpoints stay as they were.
        shutil.rmtree(tmp, ignore_errors=True)
        # A full disk shows up as OSError from Python, RuntimeError from torch.save's C++
        # writer and SafetensorError from safetensors (all seen on a real full tmpfs).
        if not isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise
        prev = latest_checkpoint(run_dir, missing_ok=True)
        kept = (
            f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        )
        raise GptlabError(
            f"could not save checkpoint {name} ({_why(e)}{_free_space(ckpt_root)}); {kept}; "
            "free disk space or choose another --out"
        ) from None
    _prune(ckpt_root, keep_last)
    return final


def _write_files(
    tmp: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    state: dict[str, Any] | None,
) -> None:
    if isinstance(model, dict):
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / WEIGHTS))
    else:
        save_model(unwrap(model), str(tmp / WEIGHTS))
    if state is not None:
        torch.save(state, tmp / STATE)
    head = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step}
    full_meta = {**head, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    (tmp / META).write_text(json.dumps(full_meta, indent=1, allow_nan=True))
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return ""
    return f"; {free / 2**20:.0f} MiB free there"


def _val_loss(ckpt: Path) -> float:
    try:
        v = json.loads((ckpt / META).read_text()).get("val_loss")
        return float(v) if v is not None else float("inf")
    except (OSError, ValueError, TypeError):
        return float("inf")


def _prune(ckpt_root: Path, keep_last: int) -> None:
    # Leftovers of saves that were killed mid-way (SIGKILL, power loss) are never valid.
    for p in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".old-step-*")]:
        shutil.rmtree(p, ignore_errors=True)
    ckpts = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    if not ckpts:
        return
    best = min(ckpts, key=_val_loss)
    if _val_loss(best) < float("inf"):
        write_text(ckpt_root / "best", best.name + "\n")
    keep = set(ckpts[-keep_last:]) | {best}
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(path: str | Path, missing_ok: bool = False) -> Path | None:
    """The checkpoint `path` names: itself, or a run's `latest` (else newest step-*)."""
    p = Path(path)
    if (p / META).is_file() or (p / WEIGHTS).is_file():
        return p
    root = p / "checkpoints"
    target = _read_pointer(root / "latest")
    if target is not None:
        return target
    ckpts = sorted(q for q in root.glob("step-*") if q.is_dir()) if root.is_dir() else []
    if ckpts:
        return ckpts[-1]
    if missing_ok:
        return None
    if not p.exists():
        raise GptlabError(
            f"{str(p)!r} does not exist; pass a run directory made by `gptlab train` (see runs/)"
        )
    if p.is_file():
        raise GptlabError(
            f"{str(p)!r} is a file, not a run or checkpoint directory; pass a directory made "
            f"by `gptlab train` (a Hugging Face model: `gptlab convert from-hf SRC OUT_DIR`)"
        )
    foreign = sorted(q.name for q in p.iterdir() if q.suffix in FOREIGN_SUFFIXES)
    if foreign:
        raise GptlabError(
            f"no gptlab checkpoint in {str(p)!r} (found {foreign[0]}, another tool's format); "
            f"for a Hugging Face GPT-2 run `gptlab convert from-hf {p} OUT_DIR`"
        )
    raise GptlabError(
        f"no checkpoint found in {str(p)!r}; train first with `gptlab train --out {p}`"
    )


def _read_pointer(pointer: Path) -> Path | None:
    """The checkpoint a pointer file names; None if missing, damaged or dangling."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name.startswith("step-") or "/" in name or "\\" in name:
        return None
    target = pointer.parent / name
    return target if target.is_dir() else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, checked to be a gptlab checkpoint this version can read."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise GptlabError(
            f"{str(ckpt)!r} is not a gptlab checkpoint (no {META}); pass a run or checkpoint directory"
        ) from None
    except (ValueError, OSError) as e:
        raise GptlabError(
            f"checkpoint metadata {str(ckpt / META)!r} is unreadable ({_why(e)}); {_earlier(ckpt)}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptlabError(
            f"{str(ckpt)!r} is not a gptlab checkpoint (foreign format); convert it or pass a gptlab run"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GptlabError(
            f"checkpoint metadata {str(ckpt / META)!r} has no valid format_version ({version!r}); "
            f"{_earlier(ckpt)}"
        )
    if version > FORMAT_VERSION:
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has format version {version}, newer than this gptlab reads "
            f"({FORMAT_VERSION}); upgrade gptlab"
        )
    return meta


def load_weights(
    model: nn.Module, ckpt: Path, device: str | torch.device = "cpu", keys: set[str] | None = None
) -> None:
    """Load a checkpoint's weights into `model` (keys and shapes must match); with `keys`, the
    file holds just those (a LoRA run's adapters) and the other weights stay."""
    path = ckpt / WEIGHTS
    if not path.is_file():
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has no {WEIGHTS}; it is incomplete: {_earlier(ckpt)}"
        )
    try:
        missing, unexpected = load_model(unwrap(model), str(path), strict=False, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} are corrupt or truncated ({_why(e)}); {_earlier(ckpt)}"
        ) from None
    except RuntimeError as e:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} do not fit this model ({_mismatch(e)}); "
            "use the model config the checkpoint was trained with"
        ) from None
    if keys is not None:
        mine = set(unwrap(model).state_dict())
        unexpected = [k for k in unexpected if k not in keys]
        missing = [k for k in keys if k not in mine or k in missing]
    if missing or unexpected:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} do not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def is_run_dir(path: str | Path) -> bool:
    """True for a gptlab run or checkpoint directory (as opposed to a Hugging Face one)."""
    p = Path(path)
    return (p / META).is_file() or (p / "checkpoints").is_dir()


def load_trained_model(
    path: str | Path, lora_base: Callable[[RunConfig], GPTModel] | None = None
) -> tuple[GPTModel, RunConfig, dict[str, Any]]:
    """(model in eval mode on the CPU, run config, meta with "path" the checkpoint used) from
    a run or checkpoint directory; `lora_base(cfg)` gives a LoRA run's base, with adapters."""
    ckpt = latest_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        cfg = RunConfig.from_dict(meta["config"])
        if not isinstance(meta["tokenizer"], dict):
            raise TypeError("tokenizer is not an object")
    except (KeyError, TypeError, AttributeError) as e:  # AttributeError: a value of the wrong kind
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has incomplete or malformed metadata ({e}); use another checkpoint"
        ) from None
    if cfg.finetune.lora_rank:
        if lora_base is None:
            raise GptlabError(
                f"{str(ckpt)!r} is a LoRA run (adapters on a base); merge it into a plain "
                "run first: gptlab convert merge-lora RUN OUT_DIR"
            )
        model = lora_base(cfg)
        load_weights(model, ckpt, keys=set(trained_state_dict(model)))
    else:
        model = GPTModel(cfg.model)
        load_weights(model, ckpt)
    return model.eval(), cfg, {**meta, "path": str(ckpt)}


def load_state(ckpt: Path) -> dict[str, Any]:
    """The training state of a checkpoint, loaded without unpickling arbitrary objects."""
    path = ckpt / STATE
    if not path.is_file():
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has no training state ({STATE}); it can be sampled but not resumed"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or hostile pickles
        raise GptlabError(
            f"training state {str(path)!r} is corrupt or not safe to load ({type(e).__name__}); "
            f"{_earlier(ckpt)}"
        ) from None


def _earlier(ckpt: Path) -> str:
    """Moved aside, a damaged checkpoint leaves `latest` falling back to the one before."""
    return f"move {str(ckpt)!r} out of the way to use the checkpoint before it"


def _mismatch(e: RuntimeError) -> str:
    """The informative line of load_state_dict's multi-line error (its first line is a title)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return ln.rstrip(".")
    return lines[-1] if lines else type(e).__name__
