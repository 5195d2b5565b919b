"""gptlab: pretrain GPT-style language models from scratch.

The walk-through's names are all here: GPTModel, GPT_CONFIG_124M, create_dataloader(_v1),
calc_loss_batch, calc_loss_loader, evaluate_model, train_model_simple,
generate_text_simple, generate, text_to_token_ids, token_ids_to_text, plot_losses.
"""

from gptlab.config import GPT_CONFIG_124M, DataConfig, ModelConfig, RunConfig, TrainConfig
from gptlab.data import (
    GPTDatasetV1,
    TokenWindowLoader,
    create_dataloader,
    create_dataloader_v1,
    load_corpus,
)
from gptlab.errors import GptlabError
from gptlab.evaluate import calc_loss_batch, calc_loss_loader, evaluate_model
from gptlab.generate import generate, generate_text_simple, text_to_token_ids, token_ids_to_text
from gptlab.model import GPTModel, count_parameters, flops_per_token
from gptlab.plot import plot_losses
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer
from gptlab.trainer import generate_and_print_sample, train_model_simple

__version__ = "0.1.0"

__all__ = [
    "GPT_CONFIG_124M",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "GPTDatasetV1",
    "TokenWindowLoader",
    "create_dataloader",
    "create_dataloader_v1",
    "load_corpus",
    "GptlabError",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "generate",
    "generate_text_simple",
    "text_to_token_ids",
    "token_ids_to_text",
    "GPTModel",
    "count_parameters",
    "flops_per_token",
    "plot_losses",
    "CharTokenizer",
    "GPT2Tokenizer",
    "get_tokenizer",
    "generate_and_print_sample",
    "train_model_simple",
]
