"""Hugging Face folders and the hub: `open_hf` reads a GPT-2 or Llama (a local folder with
model.safetensors, sharded safetensors or pytorch_model.bin, or a hub id), `convert_from_hf`
writes one as a gptlab run, and `convert_to_hf` writes a gptlab run as a folder that
transformers' AutoModelForCausalLM and AutoTokenizer load (gptlab.interop.hf_format maps
the configs and weights).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from gptlab.atomic import write_json, write_text
from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.data import chat
from gptlab.data.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    GPT2Tokenizer,
    from_identity,
    gpt2_bpe_files,
    gpt2_encoding,
)
from gptlab.errors import GptlabError
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop.hf_format import (
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import PRESETS

GPT2_VOCAB = 50257


def matching_preset(cfg: ModelConfig) -> str | None:
    """The GPT-2 preset (gpt2-small ... gpt2-xl) with this model's shape, if any."""
    if cfg.positions != "learned":
        return None
    shape = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    for name, p in PRESETS.items():
        m = p["model"]
        if name.startswith("gpt2-") and all(m.get(k) == getattr(cfg, k) for k in shape):
            return name
    return None


def _local_dir(src: str | Path) -> Path:
    """The local folder of `src` (a hub id is downloaded first), checked to hold a config."""
    path = Path(src)
    if not path.exists():
        if looks_like_hub_id(str(src)):
            path = _download(str(src))
        else:
            raise GptlabError(
                f"{str(src)!r} does not exist; pass a Hugging Face model directory or a hub id such as gpt2"
            )
    if not path.is_dir():
        raise GptlabError(f"{str(path)!r} is not a directory; pass the folder holding config.json")
    if ckpt_lib.is_run_dir(path):
        raise GptlabError(
            f"{str(path)!r} is a gptlab run, not a Hugging Face directory; use it as it is"
        )
    if not (path / "config.json").is_file():
        raise GptlabError(
            f"{str(path)!r} has no config.json; pass a Hugging Face model directory (config.json + model.safetensors)"
        )
    return path


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as e:
        raise GptlabError(f"{str(cfg_file)!r} is not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise GptlabError(f"{str(cfg_file)!r} is not a JSON object")
    return hf_cfg


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, pt_bin = path / "model.safetensors", path / "pytorch_model.bin"
    index = path / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
        if pt_bin.is_file():
            sd = torch.load(pt_bin, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError("not a state dict")
            return sd
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise GptlabError(f"the weights in {str(path)!r} are unreadable ({e})") from None
    except Exception as e:  # torch.load raises many types for damaged or unsafe pickles
        raise GptlabError(
            f"{str(pt_bin)!r} is corrupt or not safe to load ({type(e).__name__}); use model.safetensors"
        ) from None
    raise GptlabError(
        f"{str(path)!r} has no weights: expected model.safetensors or pytorch_model.bin"
    )


def looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", s))


def _download(repo_id: str) -> Path:
    """The local snapshot of hub repo `repo_id`, from huggingface_hub's cache or downloaded."""
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise GptlabError(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed; "
            "pip install 'gptlab[hf]' or pass a local directory"
        ) from None

    def fetch(local_only: bool) -> Path:
        cfg_path = Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only))
        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                hf_hub_download(repo_id, name, local_files_only=local_only)
                return cfg_path.parent
            except huggingface_hub.errors.EntryNotFoundError:
                continue  # this repo has the other format
        raise GptlabError(
            f"hub repo {repo_id!r} has neither model.safetensors nor pytorch_model.bin"
        )

    try:
        return fetch(local_only=True)
    except GptlabError:
        raise
    except Exception:  # not cached: go to the network
        pass
    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname or ""
    try:  # fail at once when offline, instead of huggingface_hub's minute of retries
        socket.getaddrinfo(host, 443)
    except OSError:
        raise GptlabError(
            f"{repo_id!r} is not a local directory and the hub ({host}) cannot be reached (offline?); "
            "pass a local Hugging Face model directory"
        ) from None
    try:
        return fetch(local_only=False)
    except GptlabError:
        raise
    except Exception as e:  # unknown or gated repo, network trouble: many types
        first = (str(e).strip().splitlines() or [""])[0]
        raise GptlabError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {first[:100]}); "
            "check the name, or pass a local directory"
        ) from None


def open_hf(src: str | Path) -> tuple[GPTModel, GPT2Tokenizer | BPETokenizer]:
    """(GPTModel in eval mode, tokenizer) of a Hugging Face GPT-2 or Llama (folder or hub id)."""
    path = _local_dir(src)
    cfg = config_from_hf(_read_config(path))
    sd = state_dict_from_hf(_load_weights(path), cfg)
    model = GPTModel(cfg)
    model.load_state_dict(sd)
    return model.eval(), hf_tokenizer(path, cfg.vocab_size)


def hf_tokenizer(path: Path, vocab_size: int) -> GPT2Tokenizer | BPETokenizer:
    """GPT-2's tokenizer, or the trained BPE of a tokenizer.json without a vocab.json."""
    file = path / "tokenizer.json"
    if not file.is_file() or (path / "vocab.json").is_file():
        return GPT2Tokenizer()
    try:
        tokenizer = BPETokenizer(file.read_text(encoding="utf-8"))
    except GptlabError:
        raise GptlabError(
            f"{str(file)!r} is no tokenizer gptlab can use (it needs a byte-level BPE with "
            f"{ENDOFTEXT}); gptlab runs use GPT-2's tokenizer or one from `gptlab tokenizer train`"
        ) from None
    if tokenizer.n_vocab > vocab_size:
        raise GptlabError(
            f"{str(file)!r} has {tokenizer.n_vocab} tokens but the model only {vocab_size}; "
            "check that the tokenizer belongs to this model"
        )
    return tokenizer


def convert_from_hf(src: str | Path, out_dir: str | Path) -> tuple[Path, ModelConfig]:
    """Write a Hugging Face GPT-2 or Llama as a gptlab run; returns (checkpoint, model config)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise GptlabError(f"{str(out)!r} is not empty; choose a new output directory")
    model, tok = open_hf(src)
    if isinstance(tok, GPT2Tokenizer) and model.cfg.vocab_size < GPT2_VOCAB:
        raise GptlabError(
            f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than GPT-2's tokenizer "
            f"({GPT2_VOCAB}); gptlab pairs imported models with the GPT-2 tokenizer unless "
            "the folder holds a trained tokenizer.json"
        )
    run_cfg = RunConfig(model=model.cfg)
    tokenizer = tok.identity()
    meta = {"config": run_cfg.to_dict(), "tokenizer": tokenizer, "source": str(src)}
    path = ckpt_lib.save_checkpoint(out, 0, model, meta)
    write_text(out / "config.json", json.dumps(run_cfg.to_dict(), indent=1))
    write_text(out / "tokenizer.json", json.dumps(tokenizer))
    return path, model.cfg


def convert_to_hf(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write a gptlab run (or checkpoint) as a Hugging Face GPT-2 or Llama directory, its chat
    template's special tokens at the run's ids (so `apply_chat_template` gives gptlab's ids);
    returns the names of the files written. A char-tokenizer run gets no tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise GptlabError(f"{str(out)!r} is not empty; choose a new output directory")
    model, _, meta = ckpt_lib.load_trained_model(run_dir)
    if model.cfg.num_classes:
        raise GptlabError(
            f"{str(run_dir)!r} is a classifier ({model.cfg.num_classes} classes, gptlab "
            "finetune): it has no causal-LM head to export; convert its base model instead"
        )
    identity = meta["tokenizer"]
    tokenizer = from_identity(identity)
    template = chat.load_template(meta["path"])
    if template is not None and chat.missing_tokens(tokenizer, template):
        raise GptlabError(
            f"the run's chat template uses {', '.join(chat.missing_tokens(tokenizer, template))}, "
            "which its tokenizer lacks; the run is inconsistent: fine-tune it again"
        )
    added = list(getattr(tokenizer, "added", {}))  # special tokens after the base's ids
    eos = getattr(tokenizer, "eot_token", None)
    sd = state_dict_to_hf(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config_to_hf(model.cfg, eos), indent=2)
        generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
        write_json(tmp / "generation_config.json", generation, indent=2)
        jinja = template.jinja() if template is not None else None
        _write_tokenizer(tmp, identity, model.cfg.context_length, added, jinja)
        names = sorted(p.name for p in tmp.iterdir())
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptlabError(f"could not write {str(out)!r} ({e.strerror or e})") from None
    return names


def _write_tokenizer(
    out: Path, identity: dict[str, Any], max_len: int, added: list[str], jinja: str | None
) -> None:
    """The run's tokenizer as transformers' files, with the chat template `jinja`, if any;
    nothing for a char tokenizer. `added` special tokens take the ids after the base's."""
    if identity.get("type") == "gpt2":
        tokenizer_class, first = "GPT2Tokenizer", _write_gpt2_tokenizer(out, added)
    elif identity.get("type") == "bpe":
        tokenizer_class = "PreTrainedTokenizerFast"
        first = _write_trained_tokenizer(out, identity["json"], added)
    else:
        return
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": max_len,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if added:
        config["additional_special_tokens"] = list(added)
        # as transformers records a special token: matched whole, never normalised
        flags = dict(special=True, single_word=False, lstrip=False, rstrip=False, normalized=False)
        config["added_tokens_decoder"] = {
            str(first + i): {"content": t, **flags} for i, t in enumerate(added)
        }
    if jinja is not None:
        config["chat_template"] = jinja  # where older transformers look
        write_text(out / "chat_template.jinja", jinja)
    write_json(out / "tokenizer_config.json", config, indent=2)


def _write_trained_tokenizer(out: Path, json_text: str, added: list[str]) -> int:
    """A trained BPE is a `tokenizers` file already; returns the first added token's id."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(json_text)
    first = tok.get_vocab_size(with_added_tokens=True)
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        got = [tok.token_to_id(t) for t in added]
        if got != list(range(first, first + len(added))):
            raise GptlabError(
                f"the tokenizer placed the special tokens {added} at ids {got}, not after its "
                f"own {first}; the run's tokenizer is inconsistent"
            )
    write_text(out / "tokenizer.json", tok.to_str())
    return first


def _write_gpt2_tokenizer(out: Path, added: list[str]) -> int:
    """OpenAI's encoder.json and vocab.bpe as vocab.json, merges.txt; returns the first id."""
    gpt2_encoding()
    encoder_json, vocab_bpe = gpt2_bpe_files()
    write_json(out / "vocab.json", json.loads(encoder_json.read_text(encoding="utf-8")), indent=2)
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    if added:
        special["additional_special_tokens"] = list(added)
    write_json(out / "special_tokens_map.json", special, indent=2)
    return GPT2_VOCAB
