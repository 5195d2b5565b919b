"""Hugging Face transformers' GPT-2 and Llama in gptlab's terms: configs and weights both
ways, in memory (gptlab.interop.hf reads and writes the folders).

`key_map` pairs every GPTModel parameter with its place in `GPT2LMHeadModel` ("gpt2") or
`LlamaForCausalLM` ("llama"); `architecture(cfg)` picks one, or refuses a model neither
can express (ReLU^2, QK-norm, soft-capped logits, rotary positions with LayerNorm, ...).

GPT-2's `Conv1D` stores weights as (in, out), the transpose of `nn.Linear`'s, and one
`c_attn` of width 3 D fuses the query, key and value projections; it has every bias
(exports write zeros for missing ones: the same function). Llama holds gptlab's tensors
under other names: gptlab's rotary layout is the one transformers stores (feature pairs
(i, i + Hd/2)), so no query/key permutation is needed. Every key and shape is checked
before anything is copied, so a wrong file changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from gptlab.config.schema import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel

GPT2_EOT = 50256  # <|endoftext|>: GPT-2's bos, eos and padding id


@dataclass(frozen=True)
class Entry:
    """One parameter's gptlab and Hugging Face names; `transpose`: HF stores the transpose
    (Conv1D); `part`: this is part 0, 1 or 2 of HF's q, k, v fused along the last dim."""

    ours: str
    theirs: str
    transpose: bool = False
    part: int | None = None


_GPT2_GLOBAL = (
    Entry("tok_emb.weight", "transformer.wte.weight"),
    Entry("pos_emb.weight", "transformer.wpe.weight"),
    Entry("final_norm.scale", "transformer.ln_f.weight"),
    Entry("final_norm.shift", "transformer.ln_f.bias"),
    Entry("out_head.weight", "lm_head.weight"),
)
_GPT2_BLOCK = (  # "{i}" is the block index
    Entry("trf_blocks.{i}.norm1.scale", "transformer.h.{i}.ln_1.weight"),
    Entry("trf_blocks.{i}.norm1.shift", "transformer.h.{i}.ln_1.bias"),
    Entry("trf_blocks.{i}.att.W_query.weight", "transformer.h.{i}.attn.c_attn.weight", True, 0),
    Entry("trf_blocks.{i}.att.W_key.weight", "transformer.h.{i}.attn.c_attn.weight", True, 1),
    Entry("trf_blocks.{i}.att.W_value.weight", "transformer.h.{i}.attn.c_attn.weight", True, 2),
    Entry("trf_blocks.{i}.att.W_query.bias", "transformer.h.{i}.attn.c_attn.bias", False, 0),
    Entry("trf_blocks.{i}.att.W_key.bias", "transformer.h.{i}.attn.c_attn.bias", False, 1),
    Entry("trf_blocks.{i}.att.W_value.bias", "transformer.h.{i}.attn.c_attn.bias", False, 2),
    Entry("trf_blocks.{i}.att.out_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    Entry("trf_blocks.{i}.att.out_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    Entry("trf_blocks.{i}.norm2.scale", "transformer.h.{i}.ln_2.weight"),
    Entry("trf_blocks.{i}.norm2.shift", "transformer.h.{i}.ln_2.bias"),
    Entry("trf_blocks.{i}.ff.layers.0.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    Entry("trf_blocks.{i}.ff.layers.0.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    Entry("trf_blocks.{i}.ff.layers.2.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    Entry("trf_blocks.{i}.ff.layers.2.bias", "transformer.h.{i}.mlp.c_proj.bias"),
)
_LLAMA_GLOBAL = (
    Entry("tok_emb.weight", "model.embed_tokens.weight"),
    Entry("final_norm.scale", "model.norm.weight"),
    Entry("out_head.weight", "lm_head.weight"),
)
_LLAMA_BLOCK = (
    Entry("trf_blocks.{i}.norm1.scale", "model.layers.{i}.input_layernorm.weight"),
    Entry("trf_blocks.{i}.att.W_query.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    Entry("trf_blocks.{i}.att.W_key.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    Entry("trf_blocks.{i}.att.W_value.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    Entry("trf_blocks.{i}.att.out_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    Entry("trf_blocks.{i}.norm2.scale", "model.layers.{i}.post_attention_layernorm.weight"),
    Entry("trf_blocks.{i}.ff.fc1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    Entry("trf_blocks.{i}.ff.fc2.weight", "model.layers.{i}.mlp.up_proj.weight"),
    Entry("trf_blocks.{i}.ff.fc3.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_MAPS = {"gpt2": (_GPT2_GLOBAL, _GPT2_BLOCK), "llama": (_LLAMA_GLOBAL, _LLAMA_BLOCK)}


def key_map(n_layers: int, arch: str = "gpt2") -> list[Entry]:
    """The full map of architecture `arch` ("gpt2" or "llama") with `n_layers` blocks."""
    global_entries, block_entries = _MAPS[arch]
    blocks = [
        Entry(e.ours.format(i=i), e.theirs.format(i=i), e.transpose, e.part)
        for i in range(n_layers)
        for e in block_entries
    ]
    return [*global_entries, *blocks]


# What each architecture fixes: (option, the value it needs, what transformers' model has).
_NEEDS = {
    "gpt2": (("norm", "layernorm", "LayerNorm"), ("mlp", "gelu", "a GELU MLP")),
    "llama": (
        ("norm", "rmsnorm", "RMSNorm"),
        ("mlp", "swiglu", "a SwiGLU MLP"),
        ("bias", False, "no biases"),
        ("qkv_bias", False, "no query/key/value biases"),
    ),
}
_NOWHERE = (  # options that neither GPT-2 nor Llama has
    ("mlp", "relu2", "export needs mlp=gelu (GPT-2) or swiglu (Llama)"),
    ("qk_norm", True, "export needs qk_norm=false"),
    ("logit_softcap", None, "export needs logit_softcap=0"),
    ("x0_skip", True, "export needs x0_skip=false"),
    ("value_embeds", None, "export needs value_embeds=0"),
)


def architecture(cfg: ModelConfig) -> str:
    """The transformers model ("gpt2": learned positions, "llama": rotary) computing `cfg`."""
    for key, bad, fix in _NOWHERE:
        value = getattr(cfg, key)
        if value == bad or (bad is None and value):
            raise GptlabError(
                f"model.{key}={_show(value)} has no Hugging Face equivalent (GPT-2 or Llama); {fix}"
            )
    arch = "gpt2" if cfg.positions == "learned" else "llama"
    where = "learned positions (GPT-2)" if arch == "gpt2" else "rotary positions (Llama)"
    for key, need, what in _NEEDS[arch]:
        if getattr(cfg, key) != need:
            raise GptlabError(
                f"model.{key}={_show(getattr(cfg, key))} has no Hugging Face equivalent with {where}, "
                f"which has {what}; export needs {key}={_show(need)} with positions={cfg.positions}"
            )
    if arch == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise GptlabError(
            f"model.n_kv_heads={cfg.n_kv_heads} has no Hugging Face equivalent with learned "
            "positions (GPT-2 has no grouped-query attention); export needs n_kv_heads=0, "
            "or rotary positions (Llama)"
        )
    return arch


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a transformers file for `cfg` (no padding rows)."""
    arch = architecture(cfg)
    # Read off the model on the meta device (no memory); GPT-2's file has every bias.
    with torch.device("meta"):
        ours = GPTModel(replace(cfg, bias=True, qkv_bias=True) if arch == "gpt2" else cfg)
    sd = ours.state_dict()
    shapes = {}
    for e in key_map(cfg.n_layers, arch):
        if e.theirs == "lm_head.weight" and cfg.tie_weights:
            continue
        shape = tuple(sd[e.ours].shape)
        if e.ours in ("tok_emb.weight", "out_head.weight"):
            shape = (cfg.vocab_size, *shape[1:])  # (V, D): no padding rows
        if e.transpose:
            shape = shape[::-1]  # Conv1D (in, out)
        if e.part is not None:
            shape = (*shape[:-1], 3 * shape[-1])  # q, k, v side by side: (D, 3D) or (3D,)
        shapes[e.theirs] = shape
    return shapes


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A gptlab ModelConfig from a GPT-2 or Llama config.json dict (refusing what it lacks)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_config_from_hf(hf)
    if kind == "llama":
        return _llama_config_from_hf(hf)
    raise GptlabError(
        f"config.json has model_type {kind!r}; gptlab converts GPT-2 and Llama models "
        "(model_type 'gpt2' or 'llama')"
    )


def _gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    try:
        D, L, H = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        V, T = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as e:
        raise GptlabError(
            f"config.json lacks a valid GPT-2 field ({e}); it needs n_embd, n_layer, n_head, vocab_size, n_positions"
        ) from None
    gelu = hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
    by_layer = bool(hf.get("scale_attn_by_inverse_layer_idx", False))
    _refuse(
        hf,
        ("activation_function", not gelu, "an activation other than GELU (tanh)"),
        ("scale_attn_weights", not hf.get("scale_attn_weights", True), "unscaled attention"),
        ("scale_attn_by_inverse_layer_idx", by_layer, "attention scaled by layer index"),
        ("add_cross_attention", bool(hf.get("add_cross_attention", False)), "cross-attention"),
    )
    return ModelConfig(
        vocab_size=V,
        context_length=T,
        emb_dim=D,
        n_heads=H,
        n_layers=L,
        drop_rate=float(hf.get("resid_pdrop", 0.1)),
        qkv_bias=True,
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
        init="gpt2",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp_hidden=int(hf.get("n_inner") or 4 * D),
    ).validate()


def _llama_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    try:
        D, L, H = (int(hf[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        V, F = int(hf["vocab_size"]), int(hf["intermediate_size"])
        Hkv = int(hf.get("num_key_value_heads") or H)
        T = int(hf.get("max_position_embeddings", 2048))
    except (KeyError, TypeError, ValueError) as e:
        raise GptlabError(
            f"config.json lacks a valid Llama field ({e}); it needs hidden_size, num_hidden_layers, "
            "num_attention_heads, intermediate_size, vocab_size"
        ) from None
    rope = hf.get("rope_parameters") or {}  # transformers 5; earlier: rope_theta, rope_scaling
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {}
    scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_type = rope.get("rope_type", "default")
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0
    _refuse(
        hf,
        ("hidden_act", hf.get("hidden_act", "silu") != "silu", "an activation other than SiLU"),
        ("rope_scaling", scaling_type != "default", f"{scaling_type} rotary scaling"),
        ("rope_parameters", rope_type != "default", f"{rope_type} rotary scaling"),
        ("partial_rotary_factor", partial, "rotary positions on part of each head"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "attention biases"),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), "MLP biases"),
        (
            "head_dim",
            hf.get("head_dim") not in (None, D // H) or D % H != 0,
            f"a head size other than hidden_size / num_attention_heads = {D}/{H}",
        ),
    )
    return ModelConfig(
        vocab_size=V,
        context_length=T,
        emb_dim=D,
        n_heads=H,
        n_layers=L,
        drop_rate=float(hf.get("attention_dropout", 0.0)),
        tie_weights=bool(hf.get("tie_word_embeddings", False)),
        init="gpt2",
        positions="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        mlp_hidden=F,
        bias=False,
        n_kv_heads=0 if Hkv == H else Hkv,
    ).validate()


def _refuse(hf: dict[str, Any], *checks: tuple[str, bool, str]) -> None:
    """Raise for the first (key, bad, what) check that is bad."""
    for key, bad, what in checks:
        if bad:
            raise GptlabError(
                f"config.json sets {key}={hf.get(key)!r} ({what}), which gptlab's GPTModel does not have"
            )


def config_to_hf(cfg: ModelConfig, eos_id: int | None = GPT2_EOT) -> dict[str, Any]:
    """The config.json of the GPT2LMHeadModel or LlamaForCausalLM with this model's shape."""
    eos = eos_id if eos_id is not None else cfg.vocab_size - 1
    if architecture(cfg) == "llama":
        return _llama_config_to_hf(cfg, eos)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None if cfg.ff_hidden == 4 * cfg.emb_dim else cfg.ff_hidden,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _llama_config_to_hf(cfg: ModelConfig, eos: int) -> dict[str, Any]:
    # rope_theta is written both ways: transformers 5 reads rope_parameters, 4.x rope_theta.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.ff_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.drop_rate,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos,  # gptlab's runs mark document starts with <|endoftext|> too
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel or LlamaForCausalLM weights -> a GPTModel state dict for `cfg`, every
    key and shape checked first; padding rows are zeros."""
    arch = architecture(cfg)
    sd = normalize_hf_keys(hf_sd, arch)
    if cfg.tie_weights:
        sd.pop("lm_head.weight", None)  # transformers ties it to the embedding, ignoring a copy
    _check_keys_and_shapes(sd, hf_shapes(cfg), arch)
    if arch == "gpt2" and not (cfg.qkv_bias and cfg.bias):
        raise GptlabError(
            "GPT-2 weights carry biases: import them into a model with bias=True and qkv_bias=True"
        )
    out: dict[str, torch.Tensor] = {}
    for e in key_map(cfg.n_layers, arch):
        if e.theirs not in sd:  # lm_head of a tied model: the same matrix as the embedding
            continue
        t = sd[e.theirs].float()
        if e.part is not None:
            t = t.chunk(3, dim=-1)[e.part]  # (D, 3D) -> (D, D), or (3D,) -> (D,)
        if e.transpose:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        out[e.ours] = t.contiguous()
    if cfg.tie_weights:
        out["out_head.weight"] = out["tok_emb.weight"]
    pad = cfg.padded_vocab_size - cfg.vocab_size
    if pad:
        for name in ("tok_emb.weight", "out_head.weight"):
            out[name] = torch.cat([out[name], out[name].new_zeros(pad, cfg.emb_dim)])  # (Vp, D)
    return out


def state_dict_to_hf(model: GPTModel) -> dict[str, torch.Tensor]:
    """A GPTModel's weights as a GPT2LMHeadModel or LlamaForCausalLM state dict (missing
    biases as zeros, no padding rows, a tied head once)."""
    cfg = model.cfg
    arch = architecture(cfg)
    expected = hf_shapes(cfg)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = ours["tok_emb.weight"].dtype
    parts: dict[str, list[torch.Tensor | None]] = {}
    out: dict[str, torch.Tensor] = {}
    for e in key_map(cfg.n_layers, arch):
        if e.theirs not in expected:  # lm_head of a tied model
            continue
        t = ours.get(e.ours)
        if t is None and e.ours.endswith((".bias", ".shift")):
            # GPT-2 has this bias; zero is the same function as none
            n = expected[e.theirs][-1] // (3 if e.part is not None else 1)
            t = torch.zeros(n, dtype=dtype)
        elif t is None:
            raise GptlabError(f"the model has no parameter {e.ours!r}; it is not a GPTModel")
        if e.ours in ("tok_emb.weight", "out_head.weight"):
            t = t[: cfg.vocab_size]  # (V, D): drop the padding rows
        if e.transpose:
            t = t.t()  # Linear (out, in) -> Conv1D (in, out)
        if e.part is None:
            out[e.theirs] = t.contiguous().clone()
        else:
            parts.setdefault(e.theirs, [None, None, None])[e.part] = t
    for name, (q, k, v) in parts.items():
        out[name] = torch.cat([q, k, v], dim=-1).contiguous()  # (D, 3D) or (3D,)
    _check_keys_and_shapes(out, expected, arch)
    return out


_GPT2_MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_LLAMA_ROPE_BUFFER = re.compile(r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def normalize_hf_keys(
    hf_sd: dict[str, torch.Tensor], arch: str = "gpt2"
) -> dict[str, torch.Tensor]:
    """Every key with the "transformer." / "model." prefix, without old files' buffers."""
    prefix, buffer = (
        ("transformer.", _GPT2_MASK_BUFFER) if arch == "gpt2" else ("model.", _LLAMA_ROPE_BUFFER)
    )
    out = {}
    for k, v in hf_sd.items():
        if buffer.match(k):
            continue
        out[k if k.startswith((prefix, "lm_head.")) else prefix + k] = v
    return out


def _check_keys_and_shapes(
    sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], arch: str = "gpt2"
) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    name = "GPT-2" if arch == "gpt2" else "Llama"
    if missing or unexpected:
        what = [
            f"{label} {keys[:3]}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise GptlabError(
            f"the weights do not match the {name} config ({'; '.join(what)}); check that config.json belongs to these weights"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise GptlabError(
                f"weight {k!r} has shape {tuple(sd[k].shape)}, but config.json implies {shape}; "
                "check that config.json belongs to these weights"
            )
