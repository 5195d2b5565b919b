"""gptlab: pretrain GPT-style language models from scratch.

The walk-through's names (GPTModel, GPT_CONFIG_124M, train_model_simple, generate, ...) are
all here, imported on first use (PEP 562), so `import gptlab` and `gptlab --help` load
neither torch nor numpy nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The module that defines each public name; to export a name, add it here.
_HOMES: dict[str, tuple[str, ...]] = {
    "config.schema": ("GPT_CONFIG_124M", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig"),
    "data.corpus": (
        "GPTDatasetV1",
        "TokenWindowLoader",
        "create_dataloader",
        "create_dataloader_v1",
        "load_corpus",
    ),
    "errors": ("GptlabError",),
    "evals.loss": ("calc_loss_batch", "calc_loss_loader", "evaluate_model"),
    "infer.sampling": (
        "generate",
        "generate_text_simple",
        "text_to_token_ids",
        "token_ids_to_text",
    ),
    "model.gpt": ("GPTModel", "count_parameters", "flops_per_token"),
    "observe.plot": ("plot_losses",),
    "data.tokenizer": ("CharTokenizer", "GPT2Tokenizer", "get_tokenizer"),
    "train.walkthrough": ("generate_and_print_sample", "train_model_simple"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = list(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
