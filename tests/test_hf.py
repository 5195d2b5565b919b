"""GPT-2 interop: gptlab's GPTModel against transformers' GPT2LMHeadModel on tiny random
configs (no downloads), both directions of conversion, files, the CLI and --init-from."""

from __future__ import annotations

import copy
import json

import pytest
import tolerances
import torch
from conftest import jitter

from gptlab.cli.main import main
from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.errors import GptlabError
from gptlab.infer.sampling import generate
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop import hf, hf_format
from gptlab.model.gpt import GPTModel
from gptlab.recipes.presets import PRESETS, preset

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=50257,
        context_length=24,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        init="gpt2",
    )
    return ModelConfig(**{**base, **kw}).validate()


def random_ours(cfg: ModelConfig, seed: int = 0) -> GPTModel:
    """A GPTModel whose every weight is random (biases and norms too), so a wrong copy shows."""
    torch.manual_seed(seed)
    return jitter(GPTModel(cfg).eval(), 0.05)


def random_theirs(tie: bool, seed: int = 0, vocab: int = 50257) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=24,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie,
    )
    return jitter(GPT2LMHeadModel(config).eval(), 0.05)


def hf_from_ours(model: GPTModel) -> GPT2LMHeadModel:
    """transformers' model built from our exported config and weights (in memory)."""
    config = {k: v for k, v in hf_format.config_to_hf(model.cfg).items() if k != "architectures"}
    config.pop("model_type")
    theirs = GPT2LMHeadModel(GPT2Config(**config)).eval()
    missing, unexpected = theirs.load_state_dict(hf_format.state_dict_to_hf(model), strict=False)
    assert not unexpected
    assert missing in ([], ["lm_head.weight"])  # a tied head is wte itself
    if model.cfg.tie_weights:
        assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    return theirs


def assert_same_logits(theirs: torch.Tensor, ours: GPTModel, x: torch.Tensor) -> None:
    """transformers' GPT-2 and ours add their sums in other orders (Conv1D's addmm against
    Linear, another attention kernel): our model in float64 says how far fp32 rounding alone
    goes on this CPU (tests/tolerances.py); a wrongly mapped weight is off by far more."""
    with torch.no_grad():
        exact = copy.deepcopy(ours).double()(x)
        tolerances.assert_close_to_rounding(theirs, ours(x), exact)


def ids(n: int = 16, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def save_run(model: GPTModel, run_dir, tokenizer: dict | None = None) -> None:
    meta = {
        "config": RunConfig(model=model.cfg).to_dict(),
        "tokenizer": tokenizer or {"type": "gpt2"},
    }
    ckpt_lib.save_checkpoint(run_dir, 3, model, meta)


# --------------------------------------------------------------------------- the same logits


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_gives_transformers_the_same_logits(tie, qkv_bias):
    ours = random_ours(tiny_cfg(tie_weights=tie, qkv_bias=qkv_bias, vocab_multiple=64))
    theirs = hf_from_ours(ours)
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("zero_qkv_bias", [False, True])
def test_import_gives_gptlab_the_same_logits(tie, zero_qkv_bias):
    theirs = random_theirs(tie)
    if zero_qkv_bias:  # a GPT-2 trained without qkv biases stores zeros there
        for block in theirs.transformer.h:
            torch.nn.init.zeros_(block.attn.c_attn.bias)
    cfg = hf_format.config_from_hf(theirs.config.to_dict())
    assert cfg.qkv_bias and cfg.tie_weights == tie
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(hf_format.state_dict_from_hf(theirs.state_dict(), cfg))
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)


def test_import_into_a_padded_vocabulary_keeps_the_logits():
    theirs = random_theirs(tie=True)
    cfg = hf_format.config_from_hf(theirs.config.to_dict())
    cfg.vocab_multiple = 64
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(hf_format.state_dict_from_hf(theirs.state_dict(), cfg))
    assert ours.tok_emb.weight.shape[0] == 50304
    x = ids()
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)


def test_round_trip_is_exact_and_the_key_map_covers_every_parameter():
    ours = random_ours(tiny_cfg(tie_weights=False, qkv_bias=True))
    names = {e.ours for e in hf_format.key_map(ours.cfg.n_layers)}
    assert names == set(ours.state_dict())
    back = GPTModel(ours.cfg)
    back.load_state_dict(hf_format.state_dict_from_hf(hf_format.state_dict_to_hf(ours), ours.cfg))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_export_writes_zero_qkv_biases_and_conv1d_transposes():
    ours = random_ours(tiny_cfg(qkv_bias=False))
    sd = hf_format.state_dict_to_hf(ours)
    assert torch.count_nonzero(sd["transformer.h.0.attn.c_attn.bias"]) == 0
    w = sd["transformer.h.1.attn.c_attn.weight"]  # (D, 3D): [q | k | v], each Linear.T
    D = ours.cfg.emb_dim
    assert torch.equal(w[:, D : 2 * D], ours.trf_blocks[1].att.W_key.weight.T)
    assert torch.equal(
        sd["transformer.h.0.mlp.c_fc.weight"], ours.trf_blocks[0].ff.layers[0].weight.T
    )


# --------------------------------------------------------------------------- files and from_pretrained


@pytest.mark.parametrize("tie", [True, False])
def test_exported_directory_loads_with_from_pretrained_and_generates_the_same(tmp_path, tie):
    ours = random_ours(tiny_cfg(tie_weights=tie, qkv_bias=False, vocab_multiple=64))
    save_run(ours, tmp_path / "run")
    names = hf.convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(names)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.tie_word_embeddings == tie
    x = ids(n=6, batch=1)
    with torch.no_grad():
        assert_same_logits(theirs(x).logits, ours, x)
        want = theirs.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert generate(ours, x, 12).tolist() == want.tolist()


def test_exported_tokenizer_is_gpt2s(tmp_path):
    save_run(random_ours(tiny_cfg()), tmp_path / "run")
    hf.convert_to_hf(tmp_path / "run", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello, world")["input_ids"] == [15496, 11, 995]
    from gptlab.data.tokenizer import GPT2Tokenizer

    text = "The café's naïve résumé — 42 ünïcödé tokens!\n\tEnd"
    assert tok(text)["input_ids"] == GPT2Tokenizer().encode(text)
    assert tok.eos_token_id == 50256


def test_char_tokenizer_run_exports_weights_only(tmp_path, capsys):
    model = random_ours(tiny_cfg(vocab_size=11))
    save_run(model, tmp_path / "run", {"type": "char", "chars": "abcdefghij"})
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "no Hugging Face tokenizer files" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "vocab.json").exists()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.config.eos_token_id == 10  # the char tokenizer's <|endoftext|>


def test_trained_bpe_run_exports_its_tokenizer(tmp_path):
    from gptlab.data.bpe import train_bpe

    texts = ["It was the best of times, it was the worst of times.", "Ça va? Très bien!"] * 20
    tok = train_bpe(texts, 300)
    save_run(random_ours(tiny_cfg(vocab_size=tok.n_vocab)), tmp_path / "run", tok.identity())
    names = hf.convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert "tokenizer.json" in names and "vocab.json" not in names
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "It was the age of wisdom. Très bien!<|endoftext|>next"
    assert theirs(text)["input_ids"] == tok.encode(text)
    assert theirs.eos_token_id == tok.eot_token


def test_import_reads_safetensors_bin_and_openai_layout(tmp_path):
    theirs = random_theirs(tie=True)
    x = ids()
    with torch.no_grad():
        want = theirs(x).logits
    theirs.save_pretrained(tmp_path / "st")
    # OpenAI's uploads: GPT2Model keys (no "transformer." prefix) with the old mask buffers,
    # as a pickle that must load with weights_only=True
    legacy = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    legacy.pop("lm_head.weight", None)
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
    (tmp_path / "bin").mkdir()
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(theirs.config.to_json_string())
    for src in ("st", "bin"):
        model = hf.open_hf(tmp_path / src)[0]
        with torch.no_grad():
            assert_same_logits(want, model, x)


def test_four_gpt2_sizes_map_onto_the_presets():
    # n_embd, n_layer, n_head of OpenAI's four releases
    sizes = {
        "gpt2-small": (768, 12, 12),
        "gpt2-medium": (1024, 24, 16),
        "gpt2-large": (1280, 36, 20),
        "gpt2-xl": (1600, 48, 25),
    }
    for name, (D, L, H) in sizes.items():
        theirs = GPT2Config(n_embd=D, n_layer=L, n_head=H).to_dict()
        cfg = hf_format.config_from_hf(theirs)
        assert hf.matching_preset(cfg) == name
        out = hf_format.config_to_hf(preset(name).model)
        assert (out["n_embd"], out["n_layer"], out["n_head"]) == (D, L, H)
        assert out["n_positions"] == 1024 and out["vocab_size"] == 50257
        assert out["layer_norm_epsilon"] == 1e-5 and out["activation_function"] == "gelu_new"
    assert set(sizes) == {n for n in PRESETS if n.startswith("gpt2-")}


# --------------------------------------------------------------------------- malformed sources


def write_hf_dir(path, model: GPT2LMHeadModel, **config_changes) -> None:
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_changes)
    (path / "config.json").write_text(json.dumps(cfg))


def cli_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # drop what setting up printed (transformers' progress bars)
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_malformed_sources_give_one_line_errors(tmp_path, capsys):
    theirs = random_theirs(tie=True)
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in cli_error(capsys, "convert", "from-hf", str(tmp_path / "empty"), out)

    write_hf_dir(tmp_path / "bert", theirs, model_type="bert")
    assert "model_type 'bert'" in cli_error(
        capsys, "convert", "from-hf", str(tmp_path / "bert"), out
    )

    write_hf_dir(tmp_path / "shape", theirs, n_embd=64)
    err = cli_error(capsys, "convert", "from-hf", str(tmp_path / "shape"), out)
    assert "shape" in err and "transformer.wte.weight" in err

    write_hf_dir(tmp_path / "layers", theirs, n_layer=3)
    assert "missing ['transformer.h.2." in cli_error(
        capsys, "convert", "from-hf", str(tmp_path / "layers"), out
    )

    write_hf_dir(tmp_path / "act", theirs, activation_function="relu")
    assert "activation_function" in cli_error(
        capsys, "convert", "from-hf", str(tmp_path / "act"), out
    )

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(theirs.config.to_json_string())
    assert "no weights" in cli_error(capsys, "convert", "from-hf", str(tmp_path / "noweights"), out)

    # a pickle that is not plain tensors is refused, never executed
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(theirs.config.to_json_string())
    torch.save({"x": GptlabError("object")}, tmp_path / "evil" / "pytorch_model.bin")
    assert "not safe to load" in cli_error(
        capsys, "convert", "from-hf", str(tmp_path / "evil"), out
    )

    assert "does not exist" in cli_error(
        capsys, "convert", "from-hf", str(tmp_path / "nothere"), out
    )
    assert not (tmp_path / "out").exists()  # nothing written by any failed conversion


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    save_run(random_ours(tiny_cfg()), tmp_path / "run")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert "not empty" in cli_error(
        capsys, "convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")
    )
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- CLI round trip and --init-from


def test_cli_round_trip_generates_the_same_text(tmp_path, capsys):
    save_run(
        random_ours(tiny_cfg(tie_weights=False, qkv_bias=False, vocab_multiple=64)),
        tmp_path / "run",
    )
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    capsys.readouterr()
    texts = []
    for run in ("run", "back"):
        args = ["generate", "--checkpoint", str(tmp_path / run), "--temperature", "0"]
        assert main([*args, "--max-new-tokens", "12", "--prompt", "Hello, world"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("Hello, world")
    meta = ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(tmp_path / "back"))
    assert meta["tokenizer"] == {"type": "gpt2"}
    assert meta["config"]["model"]["qkv_bias"] is True  # GPT-2 form: zero biases imported


def test_train_init_from_starts_from_the_source_weights(tmp_path, capsys):
    theirs = random_theirs(tie=True)
    theirs.save_pretrained(tmp_path / "hf")
    text = tmp_path / "data.txt"
    text.write_text("Every effort moves you forward, step by step. " * 200)
    out = tmp_path / "ft"
    argv = ["train", "--preset", "tiny", "--data", str(text), "--out", str(out), "--quiet"]
    argv += ["--init-from", str(tmp_path / "hf"), "--max-steps", "1", "--train.lr", "1e-9"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["emb_dim"], saved["n_layers"], saved["qkv_bias"]) == (32, 2, True)
    # one step at lr 1e-9 leaves the weights where GPT-2's were
    model = GPTModel(RunConfig.from_dict({"model": saved}).model)
    ckpt_lib.load_weights(model, ckpt_lib.latest_checkpoint(out))
    want = hf_format.state_dict_from_hf(theirs.state_dict(), model.cfg)
    for k, v in model.state_dict().items():  # AdamW moves a weight at most lr (1e-9) a step
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0)
    capsys.readouterr()
    other = ["train", "--preset", "tiny", "--data", str(text), "--out", str(tmp_path / "ft2")]
    err = cli_error(capsys, *other, "--init-from", str(tmp_path / "hf"), "--model.emb_dim", "64")
    assert "model.emb_dim cannot be set" in err


def test_gpt2_mlp_width_and_norm_epsilon_travel_both_ways():
    # n_inner and layer_norm_epsilon are GPT-2 config fields; gptlab has both options
    ours = random_ours(tiny_cfg(mlp_hidden=48, norm_eps=1e-6))
    out = hf_format.config_to_hf(ours.cfg)
    assert (out["n_inner"], out["layer_norm_epsilon"]) == (48, 1e-6)
    assert hf_format.config_from_hf(out).ff_hidden == 48
    x = ids()
    with torch.no_grad():
        assert_same_logits(hf_from_ours(ours)(x).logits, ours, x)
