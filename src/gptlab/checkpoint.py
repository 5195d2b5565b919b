"""Complete, versioned, atomic checkpoints.

A checkpoint is a directory `RUN_DIR/checkpoints/step-NNNNNNNN/` holding
  model.safetensors   the weights (no wrapper prefixes; a tied matrix stored once)
  state.pt            optimizer, scaler, trainer counters, RNG states, loss history
                      (plain tensors and containers: loaded with weights_only=True)
  meta.json           format version, step, resolved config, tokenizer identity, data
                      fingerprint, validation loss
It is written into a temporary directory beside the final one, every file fsynced, then
renamed into place; the `latest` pointer is replaced last. A crash or a full disk during a
save therefore leaves the previous checkpoint whole and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from gptlab.errors import GptlabError

FORMAT = "gptlab-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


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
    model: nn.Module,
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune old ones.

    `meta` is JSON-able (config, tokenizer, val_loss, ...); `state` holds tensors and plain
    containers. Keeps the newest `keep_last` checkpoints and the one with the best val_loss.
    Raises GptlabError if the disk refuses the write; earlier checkpoints are untouched.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(unwrap(model), str(tmp / WEIGHTS))
        if state is not None:
            torch.save(state, tmp / STATE)
        full_meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **meta,
        }
        (tmp / META).write_text(json.dumps(full_meta, indent=1, allow_nan=True))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_pointer(ckpt_root / "latest", name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir, missing_ok=True)
        kept = (
            f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        )
        raise GptlabError(
            f"could not save checkpoint {name} ({e.strerror or e}); {kept}; free disk space or choose another --out"
        ) from None
    _prune(ckpt_root, keep_last)
    return final


def _write_pointer(path: Path, name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)


def _val_loss(ckpt: Path) -> float:
    try:
        v = json.loads((ckpt / META).read_text()).get("val_loss")
        return float(v) if v is not None else float("inf")
    except (OSError, ValueError, TypeError):
        return float("inf")


def _prune(ckpt_root: Path, keep_last: int) -> None:
    ckpts = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    if not ckpts:
        return
    best = min(ckpts, key=_val_loss)
    if _val_loss(best) < float("inf"):
        _write_pointer(ckpt_root / "best", best.name)
    keep = set(ckpts[-keep_last:]) | {best}
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(path: str | Path, missing_ok: bool = False) -> Path | None:
    """The checkpoint directory named by `path`: a checkpoint itself, or a run directory
    (its `latest` pointer, else its newest step-* directory)."""
    p = Path(path)
    if (p / META).is_file() or (p / WEIGHTS).is_file():
        return p
    root = p / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir():
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
    raise GptlabError(
        f"no checkpoint found in {str(p)!r}; train first with `gptlab train --out {p}`"
    )


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
            f"checkpoint metadata {str(ckpt / META)!r} is unreadable ({e}); use an earlier checkpoint"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptlabError(
            f"{str(ckpt)!r} is not a gptlab checkpoint (foreign format); convert it or pass a gptlab run"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has format version {version}, newer than this gptlab reads "
            f"({FORMAT_VERSION}); upgrade gptlab"
        )
    return meta


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's safetensors weights into `model` (shapes and keys must match)."""
    path = ckpt / WEIGHTS
    if not path.is_file():
        raise GptlabError(
            f"checkpoint {str(ckpt)!r} has no {WEIGHTS}; it is incomplete, use an earlier one"
        )
    try:
        missing, unexpected = load_model(unwrap(model), str(path), strict=False, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} are corrupt or truncated ({e}); use an earlier checkpoint"
        ) from None
    except RuntimeError as e:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} do not fit this model ({str(e).splitlines()[0]})"
        ) from None
    if missing or unexpected:
        raise GptlabError(
            f"checkpoint weights {str(path)!r} do not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


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
            f"training state {str(path)!r} is corrupt or not safe to load ({type(e).__name__}); use an earlier checkpoint"
        ) from None
