"""Llama interop: gptlab's rotary + RMSNorm + SwiGLU models against transformers'
LlamaForCausalLM on tiny random configs (no downloads): both directions, GQA and MQA, tied
and untied heads, the files, the CLI, and the options no Hugging Face model expresses.
QK-norm, which Llama lacks, is checked against transformers' Qwen3 (built here, not exported)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import jitter
from test_hf import assert_same_logits

from gptlab.cli.main import main
from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.errors import GptlabError
from gptlab.infer.sampling import generate
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop import hf, hf_format
from gptlab.model.gpt import GPTModel

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

V = 50257  # GPT-2's tokenizer goes with these models unless a test trains its own
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False)


def llama_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V,
        context_length=24,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        init="gpt2",
        rope_theta=500.0,  # not the default: a theta that went missing would show
        norm_eps=1e-6,
        mlp_hidden=48,
        **LLAMA,
    )
    return ModelConfig(**{**base, **kw}).validate()


def random_ours(cfg: ModelConfig, seed: int = 0) -> GPTModel:
    """A GPTModel whose every weight is random (norm scales too), so a wrong copy shows."""
    torch.manual_seed(seed)
    return jitter(GPTModel(cfg).eval(), 0.1)


def random_theirs(tie: bool, n_kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=24,
        rms_norm_eps=1e-5,
        rope_theta=2000.0,
        tie_word_embeddings=tie,
    )
    return jitter(LlamaForCausalLM(config).eval(), 0.1)


def ids(n: int = 16, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def save_run(model: GPTModel, run_dir, tokenizer: dict | None = None) -> None:
    meta = {
        "config": RunConfig(model=model.cfg).to_dict(),
        "tokenizer": tokenizer or {"type": "gpt2"},
    }
    ckpt_lib.save_checkpoint(run_dir, 3, model, meta)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def cli_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab: error: ") and "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- gptlab -> transformers


@pytest.mark.parametrize("n_kv_heads", [0, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_loads_as_llama_with_the_same_logits_and_greedy_tokens(tmp_path, n_kv_heads, tie):
    ours = random_ours(llama_cfg(n_kv_heads=n_kv_heads, tie_weights=tie, vocab_multiple=64))
    save_run(ours, tmp_path / "run")
    names = hf.convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(names)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs) is LlamaForCausalLM
    assert theirs.dtype == torch.float32 and theirs.config.tie_word_embeddings == tie
    assert theirs.config.num_key_value_heads == (n_kv_heads or 4)
    if tie:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)
        prompt = x[:1, :5]
        want = theirs.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert generate(ours, prompt, 12).tolist() == want.tolist()


def test_exported_config_names_llamas_fields(tmp_path):
    cfg = llama_cfg(n_kv_heads=2, vocab_multiple=64, drop_rate=0.1)
    out = hf_format.config_to_hf(cfg)
    assert out["model_type"] == "llama" and out["architectures"] == ["LlamaForCausalLM"]
    want = {
        "vocab_size": V,  # unpadded
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "head_dim": 8,
        "max_position_embeddings": 24,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500.0,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "eos_token_id": 50256,
        "bos_token_id": 50256,
        "torch_dtype": "float32",
    }
    assert {k: out[k] for k in want} == want
    assert hf_format.config_from_hf(json.loads(json.dumps(out))) == llama_cfg(
        n_kv_heads=2, drop_rate=0.1
    )


# --------------------------------------------------------------------------- transformers -> gptlab


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_import_of_a_saved_llama_gives_the_same_logits(tmp_path, n_kv_heads, tie):
    theirs = random_theirs(tie, n_kv_heads)
    theirs.save_pretrained(tmp_path / "hf")
    ours = hf.open_hf(tmp_path / "hf")[0]
    cfg = ours.cfg
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias, cfg.qkv_bias) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    assert (cfg.kv_heads, cfg.tie_weights, cfg.ff_hidden) == (n_kv_heads, tie, 40)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.context_length) == (2000.0, 1e-5, 24)
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)


def test_import_reads_bare_llamamodel_keys_and_old_rotary_buffers():
    theirs = random_theirs(tie=False)
    cfg = hf_format.config_from_hf(theirs.config.to_dict())
    # a LlamaModel file (no "model." prefix) from a transformers that stored inv_freq
    sd = {k.removeprefix("model."): v for k, v in theirs.state_dict().items()}
    sd["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(hf_format.state_dict_from_hf(sd, cfg))
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)


def test_round_trip_is_exact_and_the_key_map_covers_every_parameter():
    for kw in (dict(n_kv_heads=2, tie_weights=False), dict(n_kv_heads=1, vocab_multiple=64)):
        ours = random_ours(llama_cfg(**kw))
        names = {e.ours for e in hf_format.key_map(ours.cfg.n_layers, "llama")}
        assert set(ours.state_dict()) <= names
        back = GPTModel(ours.cfg)
        back.load_state_dict(
            hf_format.state_dict_from_hf(hf_format.state_dict_to_hf(ours), ours.cfg)
        )
        for k, v in ours.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k


# --------------------------------------------------------------------------- what no Hugging Face model expresses

REFUSED = {
    "mlp": (dict(mlp="relu2"), "model.mlp=relu2 has no Hugging Face equivalent (GPT-2 or Llama)"),
    "qk_norm": (dict(qk_norm=True), "model.qk_norm=true"),
    "logit_softcap": (dict(logit_softcap=30.0), "model.logit_softcap=30.0"),
    "layernorm+rope": (dict(norm="layernorm"), "model.norm=layernorm"),
    "gelu+rope": (dict(mlp="gelu"), "model.mlp=gelu"),
    "bias+rope": (dict(bias=True), "model.bias=true"),
    "qkv_bias+rope": (dict(qkv_bias=True), "model.qkv_bias=true"),
    "rmsnorm+learned": (dict(positions="learned"), "model.norm=rmsnorm"),
    "swiglu+learned": (dict(positions="learned", norm="layernorm"), "model.mlp=swiglu"),
    "gqa+learned": (
        dict(positions="learned", norm="layernorm", mlp="gelu", n_kv_heads=2),
        "model.n_kv_heads=2",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_configs_no_hugging_face_model_expresses_are_refused_with_one_line(tmp_path, capsys, name):
    options, expected = REFUSED[name]
    cfg = llama_cfg(**options)
    with pytest.raises(GptlabError, match="no Hugging Face equivalent") as e:
        hf_format.architecture(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)
    save_run(GPTModel(cfg), tmp_path / "run")
    err = cli_error(capsys, "convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert expected in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()


def test_gpt2_shapes_without_biases_still_export_as_gpt2():
    # zero biases compute what no biases do: GPT-2 can express bias=False
    cfg = llama_cfg(positions="learned", norm="layernorm", mlp="gelu", norm_eps=1e-5)
    assert hf_format.architecture(cfg) == "gpt2"
    assert hf_format.config_to_hf(cfg)["n_inner"] == 48


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            "yarn rotary scaling",
        ),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_llama_options_gptlab_lacks_are_refused_on_import(tmp_path, capsys, change, expected):
    theirs = random_theirs(tie=True)
    theirs.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, "convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert expected in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI, tokenizers, --init-from


def test_cli_round_trip_with_a_trained_tokenizer_generates_the_same_text(tmp_path, capsys):
    from gptlab.data.bpe import train_bpe

    texts = ["It was the best of times, it was the worst of times.", "Ça va? Très bien!"] * 20
    tok = train_bpe(texts, 300)
    cfg = llama_cfg(vocab_size=tok.n_vocab, n_kv_heads=2, tie_weights=False, vocab_multiple=64)
    save_run(random_ours(cfg), tmp_path / "run", tok.identity())
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("It was")["input_ids"] == tok.encode(
        "It was"
    )
    meta = ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(tmp_path / "back"))
    assert meta["tokenizer"]["sha256"] == tok.identity()["sha256"]
    assert meta["config"]["model"]["n_kv_heads"] == 2
    capsys.readouterr()
    outputs = []
    for src in ("run", "back", "hf"):  # the Hugging Face folder itself opens too
        args = ["generate", "--checkpoint", str(tmp_path / src), "--temperature", "0"]
        assert main([*args, "--max-new-tokens", "12", "--prompt", "It was the"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].startswith("It was the")


def test_foreign_tokenizer_json_is_refused(tmp_path, capsys):
    theirs = random_theirs(tie=True)
    theirs.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    err = cli_error(capsys, "convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert "tokenizer.json" in err and "gptlab tokenizer train" in err


def test_train_init_from_a_llama_folder_starts_from_its_weights(tmp_path, capsys):
    theirs = random_theirs(tie=False)
    theirs.save_pretrained(tmp_path / "hf")
    text = tmp_path / "data.txt"
    text.write_text("Every effort moves you forward, step by step. " * 200)
    out = tmp_path / "ft"
    argv = ["train", "--preset", "tiny", "--data", str(text), "--out", str(out), "--quiet"]
    argv += ["--init-from", str(tmp_path / "hf"), "--max-steps", "1", "--train.lr", "1e-9"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["positions"], saved["mlp"], saved["n_kv_heads"]) == ("rope", "swiglu", 2)
    model = GPTModel(RunConfig.from_dict({"model": saved}).model)
    ckpt_lib.load_weights(model, ckpt_lib.latest_checkpoint(out))
    want = hf_format.state_dict_from_hf(theirs.state_dict(), model.cfg)
    for k, v in model.state_dict().items():  # AdamW moves a weight at most lr (1e-9) a step
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- QK-norm against Qwen3


def test_qk_norm_matches_qwen3s_per_head_rmsnorm_before_rotary():
    """gptlab's qk_norm (RMSNorm over each head's Hd features, before the rotation) is what
    Qwen3 computes: a Llama with q_norm/k_norm. Mapped here in the test only: gptlab does
    not export Qwen3."""
    Qwen3Config = pytest.importorskip("transformers").Qwen3Config
    from transformers import Qwen3ForCausalLM

    cfg = llama_cfg(qk_norm=True, n_kv_heads=2, tie_weights=False)
    ours = random_ours(cfg)
    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=24,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=False,
            attention_bias=False,
        )
    ).eval()
    base = llama_cfg(n_kv_heads=2, tie_weights=False)
    sd = hf_format.state_dict_to_hf(_without_qk_norm(ours, base))
    for i in range(cfg.n_layers):
        att = ours.trf_blocks[i].att
        sd[f"model.layers.{i}.self_attn.q_norm.weight"] = att.q_norm.scale.detach().clone()
        sd[f"model.layers.{i}.self_attn.k_norm.weight"] = att.k_norm.scale.detach().clone()
    qwen.load_state_dict(sd, strict=True)  # every key of Qwen3's, none extra
    x = ids()
    with torch.no_grad():
        assert_same_logits(qwen(x).logits, ours, x)
        # and the norms matter here: without them the logits differ
        assert max_diff(_without_qk_norm(ours, base)(x), ours(x)) > 1e-3


def _without_qk_norm(model: GPTModel, cfg: ModelConfig) -> GPTModel:
    """The same weights in a model without QK-norm (its q_norm/k_norm scales dropped)."""
    plain = GPTModel(cfg).eval()
    sd = {k: v for k, v in model.state_dict().items() if "q_norm" not in k and "k_norm" not in k}
    plain.load_state_dict(sd)
    return plain
