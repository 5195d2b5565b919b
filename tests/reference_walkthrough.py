"""An independent, deliberately plain GPT model written from the walk-through's description.

It is the yardstick for `gptlab.GPTModel`: same module names and the same order of module
creation (so `torch.manual_seed(123)` gives the same initial weights), but every piece is
spelled out by hand instead of calling fused kernels:

- LayerNorm: mean and biased variance (unbiased=False) over the last dim, eps 1e-5, then
  `scale * x_hat + shift`.
- GELU: the tanh approximation written as a formula.
- MultiHeadAttention: separate W_query/W_key/W_value projections, a registered float
  upper-triangular mask buffer, scores scaled by sqrt(head_dim), masked softmax, dropout on
  the attention weights, out_proj.
- TransformerBlock: pre-norm attention and feed-forward, each with dropout and a residual.
- GPTModel: token + position embeddings, dropout, blocks, final norm, linear head (no bias).

Only what the tests need is here; it is not imported by gptlab.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RefLayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = (centred * centred).mean(dim=-1, keepdim=True)  # biased, as unbiased=False
        return self.scale * (centred / torch.sqrt(variance + self.eps)) + self.shift


class RefGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1.0 + torch.tanh(inner))


class RefFeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), RefGELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefMultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool,
    ):
        super().__init__()
        assert d_out % num_heads == 0
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # 1.0 above the diagonal marks the future positions a token may not look at
        future = torch.ones(context_length, context_length).triu(diagonal=1)
        self.register_buffer("mask", future)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self._heads(self.W_query(x))
        k = self._heads(self.W_key(x))
        v = self._heads(self.W_value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))
        blocked = self.mask[:n, :n].bool()
        scores = scores.masked_fill(blocked, -torch.inf)
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        weights = self.dropout(weights)
        ctx = torch.matmul(weights, v).permute(0, 2, 1, 3).reshape(b, n, self.d_out)
        return self.out_proj(ctx)


class RefTransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.att = RefMultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            dropout=cfg["drop_rate"],
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = RefFeedForward(cfg)
        self.norm1 = RefLayerNorm(cfg["emb_dim"])
        self.norm2 = RefLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class RefGPTModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*(RefTransformerBlock(cfg) for _ in range(cfg["n_layers"])))
        self.final_norm = RefLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        positions = torch.arange(n, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.trf_blocks:
            x = block(x)
        return self.out_head(self.final_norm(x))
