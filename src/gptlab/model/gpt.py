"""GPTModel: token ids in, logits out, and nothing else.

The architecture and module names are the walk-through's (GPT-2 shape, pre-LayerNorm
blocks), and a model built from `GPT_CONFIG_124M` after `torch.manual_seed(123)` has its
initial weights (same module order, PyTorch's default initialisation). What differs, and why:

- LayerNorm and GELU keep the walk-through's parameter names (`scale`, `shift`) but call
  the fused `F.layer_norm` and `F.gelu(approximate="tanh")`: the same math, faster.
- Attention defaults to `F.scaled_dot_product_attention`; `attention="manual"` keeps the
  walk-through's explicit masked softmax.
- No causal-mask buffer: the walk-through's saved `...att.mask` entries are dropped on
  load, so its checkpoints load unchanged.
- `forward(new_ids, cache)` with a `KVCache` runs only the new tokens against the cached
  keys and values (how `generate` samples quickly).
- Optional: weight tying; a vocabulary padded to a multiple of 64 (logits cut back to
  `vocab_size`); GPT-2's initialisation; `use_fast_dropout`, faster CPU dropout masks (same
  distribution to 1.5e-5 in p, another random stream); `use_activation_checkpointing`,
  blocks recomputed in backward for less memory, with the same results (BENCHMARKS.md).
- Options from later models, off by default (so the walk-through's presets build exactly
  its model): rotary positions, RMSNorm, QK-norm, SwiGLU and ReLU^2 MLPs, no biases,
  grouped-query attention, soft-capped logits, zero-initialised output projections
  (`ModelConfig`; the README's table says what each is).

Loss, sampling, precision, compilation and parallelism all live outside this file.

Shape legend:
    B   batch size              T   sequence length (<= context_length)
    D   emb_dim                 H   n_heads
    Hd  head_dim = D // H       V   vocab_size (Vp: padded to vocab_multiple)
    Hkv key/value heads (n_kv_heads; H unless grouped-query attention)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from gptlab.config.schema import ModelConfig
from gptlab.model.kvcache import KVCache


def as_model_config(cfg: ModelConfig | dict[str, Any]) -> ModelConfig:
    """Accept the walk-through's plain dict or a ModelConfig."""
    return cfg.validate() if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(dict(cfg))


class LayerNorm(nn.Module):
    """Layer norm over the last dim, with the walk-through's `scale`/`shift` (bias=False: none)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) * scale, no centring, no shift; statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.scale.shape, eps=self.eps).to(x.dtype) * self.scale


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm `cfg.norm` names, over `dim` features (default emb_dim)."""
    dim = dim or cfg.emb_dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps, bias=cfg.bias)


class GELU(nn.Module):
    """GELU with the tanh approximation that GPT-2 was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class ReLUSquared(nn.Module):
    """relu(x)^2: sparse like ReLU, smooth at 0 in its gradient (the GPT-2 speedruns' MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Dropout(nn.Dropout):
    """nn.Dropout; with `fast` set (off by default), CPU tensors get masks from
    `fast_dropout_mask` instead of one Bernoulli draw per element, a visible share of a small
    model's step (BENCHMARKS.md)."""

    fast: bool = False

    def uses_fast_mask(self, x: torch.Tensor) -> bool:
        return self.fast and self.training and self.p > 0 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fast_mask(x):
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        keep = fast_dropout_mask(x.shape, self.p, x.device)  # same shape as x, bool
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


def fast_dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device) -> torch.Tensor:
    """Bool keep-mask of `shape`, each element kept with probability 1 - p (to 2^-15): one
    63-bit draw per 4 elements, each 16-bit lane's top bit masked off (`random_` leaves the
    sign bit 0), so lanes are uniform over 0..32767 and drop below round(p * 32768)."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # (n/4,)
    lanes = bits.view(torch.int16)[:n].view(shape)  # 4 lanes per draw, 16 bits each
    return (lanes & 0x7FFF) >= round(p * 32768)


def use_fast_dropout(model: nn.Module, on: bool = True) -> None:
    """Switch every `Dropout` in `model` to the fast CPU masks (or back)."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.fast = on


def use_activation_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Have every GPTModel in `model` keep only its blocks' inputs and rerun them in backward
    (or not); random state is replayed, so loss, gradients and random stream are unchanged."""
    for module in model.modules():
        if isinstance(module, GPTModel):
            module.checkpoint_blocks = on


class FeedForward(nn.Module):
    """Two-matrix MLP: D -> hidden -> D through GELU (GPT-2) or ReLU^2 (`cfg.mlp`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.ff_hidden, bias=cfg.bias),
            ReLUSquared() if cfg.mlp == "relu2" else GELU(),
            nn.Linear(cfg.ff_hidden, cfg.emb_dim, bias=cfg.bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @property
    def out_proj(self) -> nn.Linear:
        """The matrix that writes back to the residual stream."""
        return self.layers[2]


class SwiGLU(nn.Module):
    """Llama's gated MLP: fc3(silu(fc1 x) * fc2 x), D -> hidden -> D (fc1 gate, fc2 up, fc3
    down: the names of the walk-through's Llama chapter)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, cfg.ff_hidden, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.emb_dim, cfg.ff_hidden, bias=cfg.bias)
        self.fc3 = nn.Linear(cfg.ff_hidden, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))  # (B, T, D)

    @property
    def out_proj(self) -> nn.Linear:
        return self.fc3


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (fp32, (T, Hd), or (B, 1, T, Hd) for per-row positions) of the rotary
    angles at `positions` (T,) or (B, T). Feature pair (i, i + Hd/2) turns by position *
    theta^(-2i/Hd): Llama's layout as Hugging Face stores it (no weight permutation)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / theta**exponents  # (Hd/2,), rounded as Hugging Face's Llama rounds it
    angles = positions.float()[..., None] * inv_freq  # (..., T, Hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, Hd)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, Hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate queries or keys (B, H, T, Hd) by the angles of `rope_angles`; same shape and dtype."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, Hd)
    return (x * cos + rotated * sin).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query/key/value projections; after the
    walk-through's arguments, options off by default: `num_kv_heads` < num_heads (grouped-query
    attention; 1 is multi-query), `qk_norm` (RMS-normalised queries and keys)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        attention: str = "sdpa",
        num_kv_heads: int | None = None,
        out_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.attention = attention
        d_kv = self.num_kv_heads * self.head_dim
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_kv, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_kv, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias)
        self.dropout = Dropout(dropout)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        # The walk-through stores its causal mask as a buffer; its checkpoints carry it.
        self._register_load_state_dict_pre_hook(_drop_walkthrough_mask)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With a cache, x holds only the new positions; `rope`
        rotates queries and keys. `attn_mask` (B, 1, T, T) bool, without a cache: the keys each
        query sees (True), in place of the causal mask (packed examples). `value_embed`
        (B, T, Hkv Hd) is added to the values (GPTModel's value embeddings)."""
        B, T, _ = x.shape
        H, Hkv, Hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, D), (B, T, Hkv Hd) x 2
        if value_embed is not None:
            v = v + value_embed.to(v.dtype)  # (B, T, Hkv Hd)
        q = q.view(B, T, H, Hd).transpose(1, 2)  # (B, H, T, Hd)
        k = k.view(B, T, Hkv, Hd).transpose(1, 2)  # (B, Hkv, T, Hd)
        v = v.view(B, T, Hkv, Hd).transpose(1, 2)  # (B, Hkv, T, Hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        mask = attn_mask  # None: causal over the T positions
        if cache is not None:
            # Attend over the cached past too: Tk = past + T keys; mask (T, Tk) or None (all).
            k, v, mask = cache.update(layer, k, v)  # (B, Hkv, Tk, Hd) x 2
        if Hkv != H:  # each key/value head serves H / Hkv query heads
            k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, Hd)
            v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, Hd)

        # SDPA's CPU kernels have no dropout: with it they fall back to the same math as
        # below, with PyTorch's slower masks; the fast ones need the explicit path.
        if self.attention == "sdpa" and not self.dropout.uses_fast_mask(q):
            p = self.dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=cache is None and mask is None
            )  # (B, H, T, Hd)
        else:
            scores = q @ k.transpose(2, 3)  # (B, H, T, Tk)
            if cache is None and mask is None:
                future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
                scores = scores.masked_fill(future, float("-inf"))
            elif mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores / math.sqrt(Hd), dim=-1)  # (B, H, T, Tk)
            ctx = self.dropout(weights) @ v  # (B, H, T, Hd)

        ctx = ctx.transpose(1, 2).reshape(B, T, self.d_out)  # (B, T, D)
        return self.out_proj(ctx)


def _drop_walkthrough_mask(state_dict, prefix, *args, **kwargs) -> None:
    state_dict.pop(prefix + "mask", None)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
            attention=cfg.attention,
            num_kv_heads=cfg.kv_heads,
            out_bias=cfg.bias,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
        )
        self.ff = SwiGLU(cfg) if cfg.mlp == "swiglu" else FeedForward(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.drop_shortcut = Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shortcut = x
        x = self.att(self.norm1(x), cache, layer, rope, attn_mask, value_embed)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x)))
        return x + shortcut


class GPTModel(nn.Module):
    """GPT-2-style decoder: token ids (B, T) -> logits (B, T, V). `cfg` is the walk-through's
    dict (e.g. `GPT_CONFIG_124M`) or a `ModelConfig`, whose options default to GPT-2's."""

    checkpoint_blocks: bool = False  # see use_activation_checkpointing

    def __init__(self, cfg: ModelConfig | dict[str, Any]):
        super().__init__()
        self.cfg = cfg = as_model_config(cfg)
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.emb_dim)
        # Rotary positions turn queries and keys inside attention instead: no table.
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.positions == "learned" else None
        )
        self.drop_emb = Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg)
        if cfg.num_classes:  # the book's classifier: a fresh Linear in place of the LM head
            self.out_head = nn.Linear(cfg.emb_dim, cfg.num_classes)
        else:
            self.out_head = nn.Linear(cfg.emb_dim, vocab, bias=False)
        if cfg.tie_weights and not cfg.num_classes:
            # One matrix maps ids to vectors and vectors back to id scores (as in GPT-2).
            self.out_head.weight = self.tok_emb.weight
        if cfg.init == "gpt2":
            init_gpt2_weights(self)
        if cfg.zero_init_proj:
            zero_output_projections(self)
        # The speedruns' options, created last so that the modules above draw the same
        # initial weights with or without them; each starts as a no-op.
        self.value_embeds = None
        if cfg.value_embeds:  # one table a block, for the last value_embeds blocks
            d_kv = cfg.kv_heads * cfg.head_dim
            self.value_embeds = nn.ModuleList(
                nn.Embedding(vocab, d_kv) for _ in range(cfg.value_embeds)
            )
            for table in self.value_embeds:
                nn.init.zeros_(table.weight)
        self.resid_scales = self.x0_scales = None
        if cfg.x0_skip:  # block i reads resid_scales[i] * x + x0_scales[i] * x0
            self.resid_scales = nn.Parameter(torch.ones(cfg.n_layers))
            self.x0_scales = nn.Parameter(torch.zeros(cfg.n_layers))
        if vocab != cfg.vocab_size:
            with torch.no_grad():  # rows for padded ids are never looked up nor scored
                self.tok_emb.weight[cfg.vocab_size :].zero_()
                if not cfg.num_classes:
                    self.out_head.weight[cfg.vocab_size :].zero_()

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V) (a classifier's: (B, T, num_classes)). With a
        `cache`, in_idx holds only the new tokens; `doc_ids` (B, T): see `hidden_states`."""
        return self.head_logits(self.hidden_states(in_idx, cache, doc_ids))

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V) (or (..., num_classes)): the output head,
        cut to vocab_size and soft-capped."""
        logits = self.out_head(hidden)  # (..., Vp) or (..., num_classes)
        if self.cfg.num_classes:
            return logits
        if logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]  # padded ids never reach a loss or sampler
        return softcap(logits, self.cfg.logit_softcap)

    def hidden_states(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-normed hidden states (B, T, D), the output head's input
        (where `gptlab.model.loss.chunked_cross_entropy` starts). `doc_ids` (B, T), without a
        cache: packed examples, each a run of equal ids, each computed as if it were alone."""
        B, T = in_idx.shape
        attn_mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed examples) cannot be combined with a KV cache")
            positions, attn_mask = _packed_positions_and_mask(doc_ids)  # (B, T), (B, 1, T, T)
        if cache is None:
            if T > self.cfg.context_length:
                raise ValueError(
                    f"sequence length {T} exceeds the model's context_length {self.cfg.context_length}; "
                    "crop the input to the last context_length tokens"
                )
            if attn_mask is None:
                positions = torch.arange(T, device=in_idx.device)  # (T,)
        else:
            if cache.max_len > self.cfg.context_length:
                raise ValueError(
                    f"KV cache max_len {cache.max_len} exceeds context_length {self.cfg.context_length}"
                )
            # (T,), or (B, T) for a cache whose rows stand at different positions
            positions = cache.advance(T, in_idx.device)
        x = self.tok_emb(in_idx)  # (B, T, D)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (B, T, D) + (T, D) or (B, T, D)
        else:
            rope = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x0 = x = self.drop_emb(x)  # (B, T, D)
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        first_ve = self.cfg.n_layers - self.cfg.value_embeds  # the first block with a table
        for layer, block in enumerate(self.trf_blocks):
            if self.x0_scales is not None:
                x = self.resid_scales[layer] * x + self.x0_scales[layer] * x0  # (B, T, D)
            ve = None
            if self.value_embeds is not None and layer >= first_ve:
                ve = self.value_embeds[layer - first_ve](in_idx)  # (B, T, Hkv Hd)
            if recompute:  # keep x only; backward reruns the block
                x = recompute_in_backward(
                    block, x, None, layer, rope, attn_mask, ve, use_reentrant=False
                )
            else:
                x = block(x, cache, layer, rope, attn_mask, ve)  # (B, T, D)
        return self.final_norm(x)  # (B, T, D)


def _packed_positions_and_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at 0 where doc_ids changes, and the attention mask
    (B, 1, T, T): query i sees key j when j <= i and both belong to the same example."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T): an example begins here
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return idx - first, (same & causal)[:, None]  # (B, T), (B, 1, T, T)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): logits squashed into (-cap, cap); unchanged when cap is 0."""
    return cap * torch.tanh(logits / cap) if cap else logits


def init_gpt2_weights(model: GPTModel) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and residual projections
    scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
    std = 0.02
    resid_std = std / math.sqrt(2 * model.cfg.n_layers)
    resid = {id(m) for m in _output_projections(model)}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=resid_std if id(module) in resid else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def _output_projections(model: GPTModel) -> list[nn.Linear]:
    """The layers that write into the residual stream: attention's and the MLP's last."""
    return [m for block in model.trf_blocks for m in (block.att.out_proj, block.ff.out_proj)]


def zero_output_projections(model: GPTModel) -> None:
    """Zero the residual-stream writers (weights and biases): each block starts as the
    identity, and the first updates decide what it adds (as the GPT-2 speedruns do)."""
    with torch.no_grad():
        for proj in _output_projections(model):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()


def count_parameters(model: nn.Module, exclude_out_head: bool = False) -> int:
    """Number of distinct parameters (a tied matrix counts once). `exclude_out_head` leaves an
    untied head's matrix out, as the walk-through does to compare with GPT-2's "124M"."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_out_head and model.out_head.weight is not model.tok_emb.weight:
        total -= model.out_head.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H Hd T. N: the parameters of
    a meta-device model except look-ups (position embedding, an untied token embedding);
    the second term is attention's QK^T and AV at length T (default: context_length)."""
    T = seq_len or cfg.context_length
    with torch.device("meta"):
        model = GPTModel(cfg)
    lookups = [model.pos_emb.weight] if model.pos_emb is not None else []
    lookups += [table.weight for table in model.value_embeds or []]
    if model.out_head.weight is not model.tok_emb.weight:
        lookups.append(model.tok_emb.weight)
    n_matmul = count_parameters(model) - sum(p.numel() for p in lookups)
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
