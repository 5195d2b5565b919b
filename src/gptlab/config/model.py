"""The [model] section: the shape and options of a GPTModel."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from gptlab.config.fields import BELOW_ONE, NON_NEGATIVE, POSITIVE, check_fields, setting
from gptlab.errors import GptlabError


@dataclass
class ModelConfig:
    """Shape and options of a GPTModel. Field names follow the walk-through's dict."""

    vocab_size: int = setting(
        50257, "token ids the embedding and output head cover", bounds=POSITIVE
    )
    context_length: int = setting(
        1024, "longest input in tokens (rows of the position embedding)", bounds=POSITIVE
    )
    emb_dim: int = setting(768, "width of the embeddings and of every block", bounds=POSITIVE)
    n_heads: int = setting(
        12, "attention heads per block; emb_dim must be divisible by it", bounds=POSITIVE
    )
    n_layers: int = setting(12, "transformer blocks", bounds=POSITIVE)
    drop_rate: float = setting(
        0.1, "dropout probability on embeddings, attention and shortcuts", bounds=BELOW_ONE
    )
    qkv_bias: bool = setting(False, "give the query, key and value projections a bias")
    # gptlab's additions; the defaults reproduce the walk-through's model exactly.
    tie_weights: bool = setting(False, "share tok_emb and out_head weights (as GPT-2 does)")
    attention: str = setting(
        "sdpa",
        "sdpa: PyTorch's fused attention kernels; manual: the walk-through's masked softmax",
        choices=("sdpa", "manual"),
    )
    vocab_multiple: int = setting(
        1,
        "pad the embedding and head rows to a multiple of this (e.g. 64, for matmul kernels)",
        bounds=POSITIVE,
    )
    init: str = setting(
        "pytorch",
        "pytorch: PyTorch's default initialisation (the walk-through); gpt2: GPT-2's N(0, 0.02)",
        choices=("pytorch", "gpt2"),
    )
    # Options of later models (Llama, the GPT-2 speedruns); each default is GPT-2's.
    positions: str = setting(
        "learned",
        "learned: a position embedding table (GPT-2); rope: rotary q/k rotations (Llama)",
        choices=("learned", "rope"),
    )
    rope_theta: float = setting(
        10000.0, "rotary base: wavelengths up to 2 pi theta", bounds=POSITIVE
    )
    norm: str = setting(
        "layernorm",
        "layernorm (GPT-2) or rmsnorm (Llama: no centring, no shift)",
        choices=("layernorm", "rmsnorm"),
    )
    norm_eps: float = setting(1e-5, "epsilon of every norm", bounds=POSITIVE)
    qk_norm: bool = setting(False, "RMS-normalise each head's queries and keys before attention")
    mlp: str = setting(
        "gelu",
        "gelu (GPT-2), swiglu (Llama: silu(fc1 x) * fc2 x), relu2 (relu(x)^2, the speedruns)",
        choices=("gelu", "swiglu", "relu2"),
    )
    mlp_hidden: int = setting(
        0,
        "hidden width of the MLP; 0 = 4 x emb_dim (gelu, relu2) or 8/3 x emb_dim rounded up "
        "to a multiple of 64 (swiglu)",
        bounds=NON_NEGATIVE,
    )
    bias: bool = setting(
        True, "biases in the output projections, the MLP and LayerNorm (qkv_bias: in q, k, v)"
    )
    n_kv_heads: int = setting(
        0,
        "key/value heads for grouped-query attention; n_heads must be a multiple; "
        "0 = n_heads (1: multi-query)",
        bounds=NON_NEGATIVE,
    )
    logit_softcap: float = setting(
        0.0, "squash logits into (-c, c) with c * tanh(logits / c); 0 = off", bounds=NON_NEGATIVE
    )
    zero_init_proj: bool = setting(
        False, "start the attention and MLP output projections at zero (blocks begin as identity)"
    )
    x0_skip: bool = setting(
        False,
        "feed every block a learned mix of its input and the embedding output x0 "
        "(the GPT-2 speedruns' x0 skip; starts as off)",
    )
    value_embeds: int = setting(
        0,
        "give the last N blocks a table of per-token vectors added to attention's values "
        "(the speedruns' value embeddings; zero at the start); 0 = off",
        bounds=NON_NEGATIVE,
    )
    num_classes: int = setting(
        0,
        "0: the output head scores the vocabulary; N: a classification head of N classes "
        "(Linear(emb_dim, N) with a bias, the book's chapter 6), set by `gptlab finetune`",
        bounds=NON_NEGATIVE,
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from the walk-through's plain dict (or any dict of ModelConfig fields)."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise GptlabError(
                f"unknown model config key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**d).validate()

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when that is 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def ff_hidden(self) -> int:
        """The MLP's hidden width (mlp_hidden, or the option's customary default)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # 8/3 x keeps the parameter count of a 4 x two-matrix MLP
            return math.ceil(8 * self.emb_dim / 3 / 64) * 64
        return 4 * self.emb_dim

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> ModelConfig:
        check_fields(self, "model")
        if self.emb_dim % self.n_heads:
            raise GptlabError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}); "
                "change one of them"
            )
        if self.n_heads % self.kv_heads:
            raise GptlabError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                f"({self.n_kv_heads}); pick n_kv_heads among its divisors"
            )
        if self.value_embeds > self.n_layers:
            raise GptlabError(
                f"model.value_embeds ({self.value_embeds}) is more than model.n_layers "
                f"({self.n_layers}); give at most one table a block"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise GptlabError(
                f"rotary positions need an even head size, got emb_dim / n_heads = {self.head_dim}; "
                "change model.emb_dim or model.n_heads"
            )
        return self
