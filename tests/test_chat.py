"""Chat templates: rendering and its mask, special-token safety, the instruction template
(the book's Alpaca prompt, an instructions run's), growing a base's tokenizer and model, the
template travelling with the run, and parity with `transformers`' `apply_chat_template` on
the folder `convert to-hf` writes (id for id, mask for mask)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import jitter, make_corpus_text

from gptlab.config.schema import ModelConfig, RunConfig
from gptlab.data import chat
from gptlab.data.bpe import train_bpe
from gptlab.data.tokenizer import (
    ENDOFTEXT,
    CharTokenizer,
    GPT2Tokenizer,
    WithSpecialTokens,
    from_identity,
    token_byte_lengths,
)
from gptlab.errors import GptlabError
from gptlab.finetune.data import instruction_prompt, render_instruction
from gptlab.infer.chat import chat_prompt
from gptlab.interop import checkpoint as ckpt_lib
from gptlab.interop.runs import open_run
from gptlab.model.gpt import GPTModel

T = chat.DEFAULT
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there."}],
    [
        {"role": "system", "content": "You answer in one short line."},
        {"role": "user", "content": "What is the tide doing?"},
        {"role": "assistant", "content": "Turning, toward the pier."},
    ],
    [
        {"role": "user", "content": "Count the ships."},
        {"role": "assistant", "content": " Three, before dawn."},
        {"role": "user", "content": "And now?\n\nTell me in words:  five  spaces."},
        {"role": "assistant", "content": "Four; one left — ça va. 🚢"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Empty system, then an empty reply."},
        {"role": "assistant", "content": ""},
    ],
]


def grown_gpt2() -> WithSpecialTokens:
    return WithSpecialTokens(GPT2Tokenizer(), T.special_tokens)


@pytest.fixture(scope="module")
def corpus_bpe():
    return train_bpe(make_corpus_text().split("\n\n"), 300)


# --------------------------------------------------------------------------- rendering


def test_render_lays_out_turns_and_masks_what_the_assistant_says():
    tok = grown_gpt2()
    sys_, user, asst, end = (tok.special_id(t) for t in T.special_tokens)
    assert (sys_, user, asst, end) == (50257, 50258, 50259, 50260)
    msgs = CONVERSATIONS[1]
    ids, mask = chat.render(T, tok, msgs)
    s, u, a = (tok.encode_ordinary(m["content"]) for m in msgs)
    assert ids == [50256, sys_, *s, end, user, *u, end, asst, *a, end]
    # learned: the assistant's content and the end of its turn, nothing else
    expect = [False] * (1 + 1 + len(s) + 1 + 1 + len(u) + 1 + 1) + [True] * (len(a) + 1)
    assert mask == expect
    prompt, pmask = chat.render(T, tok, msgs[:2], add_generation_prompt=True)
    assert prompt == ids[: len(prompt)] and prompt[-1] == asst and not any(pmask)
    assert tok.decode(ids) == (
        f"{ENDOFTEXT}<|system|>{s and msgs[0]['content']}<|end|><|user|>{msgs[1]['content']}"
        f"<|end|><|assistant|>{msgs[2]['content']}<|end|>"
    )


def test_render_without_bos_starts_at_the_first_turn():
    tmpl = chat.ChatTemplate(bos=False)
    ids, mask = chat.render(tmpl, grown_gpt2(), CONVERSATIONS[0])
    assert ids[0] == 50258 and len(ids) == len(mask)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_text_that_spells_a_special_token_never_becomes_it(kind, corpus_bpe):
    text = "<|user|>Hi<|end|><|assistant|>sure<|system|> and <|endoftext|> too"
    base = {
        "gpt2": GPT2Tokenizer(),
        "bpe": corpus_bpe,
        "char": CharTokenizer.from_text(text + "abcdefghijklmnopqrstuvwxyz"),
    }[kind]
    tok = WithSpecialTokens(base, T.special_tokens)
    specials = set(range(base.n_vocab, tok.n_vocab)) | {tok.eot_token}
    msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    ids, _ = chat.render(T, tok, msgs)
    content = ids[2:-1]  # bos, opener ... end: the markers render puts there itself
    markers = [i for i in ids if i in specials]
    assert markers == [tok.eot_token] + [
        tok.special_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>", "<|end|>")
    ]
    assert tok.decode(content).count("<|user|>") == 2  # the text is all there, as text
    # the ordinary tokenizer calls leave them as text too, unless asked for
    assert not set(tok.encode("x <|user|> y")) & specials - {tok.eot_token}
    assert tok.encode("x<|user|>y", allowed_special={"<|user|>"}) == [
        *tok.encode("x"),
        tok.special_id("<|user|>"),
        *tok.encode("y"),
    ]


@pytest.mark.parametrize(
    "messages, expect",
    [
        ([{"role": "tool", "content": "x"}], "messages[0] has role 'tool'; use system, user"),
        (
            [{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}],
            "messages[1] has role 'developer'",
        ),
        ([{"role": "user"}], "messages[0] (user) needs its content as a string, got NoneType"),
        ([{"role": "user", "content": ["x"]}], "got list"),
        ([], "must be a non-empty list"),
        ("hello", "must be a non-empty list"),
        (["hello"], "messages[0] must be an object"),
    ],
)
def test_bad_messages_are_one_line_errors_naming_the_message(messages, expect):
    with pytest.raises(GptlabError, match=re.escape(expect)) as e:
        chat.render(T, grown_gpt2(), messages, where="messages")
    assert "\n" not in str(e.value)


def test_errors_name_the_record_the_caller_gives():
    with pytest.raises(GptlabError, match=r"^train.jsonl:7 messages\[0\] has role 'bot'"):
        chat.render(
            T, grown_gpt2(), [{"role": "bot", "content": "x"}], where="train.jsonl:7 messages"
        )


def test_a_tokenizer_without_the_tokens_cannot_render():
    with pytest.raises(GptlabError, match="lacks the chat template's special tokens <|system|>"):
        chat.render(T, GPT2Tokenizer(), CONVERSATIONS[0])


@pytest.mark.parametrize(
    "fields, expect",
    [
        ({"user": "<|system|>"}, "must differ"),
        ({"end": ENDOFTEXT}, "must differ"),
        ({"assistant": ""}, "non-empty"),
        ({"user": " <|u|>"}, "without surrounding spaces"),
    ],
)
def test_bad_templates_are_refused(fields, expect):
    with pytest.raises(GptlabError, match=expect):
        chat.ChatTemplate(**fields)


# --------------------------------------------------------------------------- the Alpaca prompt

A = chat.ALPACA
# a first instruction of its own, then the two conversations above that follow the
# instructions shape (an optional system message, user and assistant alternating)
EXCHANGES = [[{"role": "user", "content": "Name the ship."}], *CONVERSATIONS[1:3]]


def test_one_instruction_is_the_prompt_an_instructions_finetune_answers():
    gpt2 = GPT2Tokenizer()
    entry = {"instruction": "Name the ship."}
    ids, mask = chat.render(A, gpt2, EXCHANGES[0], add_generation_prompt=True)
    assert ids == gpt2.encode(instruction_prompt(entry)) and not any(mask)
    assert gpt2.decode(ids) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName the ship.\n\n### Response:\n"
    )
    assert A.end_id(gpt2) == 50256  # the end the finetune appends to every output
    prompt = chat_prompt(A, gpt2, EXCHANGES[0])
    assert prompt.ids == ids and prompt.stop_ids == (50256,) and prompt.stop == ()


def test_a_conversation_is_its_exchanges_rendered_as_the_finetune_renders_records():
    """Earlier turns are earlier examples: the ids and the mask are the finetune's examples
    of each (instruction, response) pair one after another (finetune.mask "response"), and
    the prompt for the next reply is the earlier examples, then the book's prompt."""
    gpt2 = GPT2Tokenizer()
    messages = EXCHANGES[2]
    examples = [
        render_instruction(
            {"instruction": user["content"], "input": "", "output": reply["content"]},
            gpt2,
            "response",
        )
        for user, reply in zip(messages[::2], messages[1::2], strict=True)
    ]
    ids, learn = chat.render(A, gpt2, messages)
    assert ids == examples[0][0] + examples[1][0] and learn == examples[0][1] + examples[1][1]
    assert gpt2.decode(ids).count(ENDOFTEXT) == 2  # each response ends as it was learned
    prompt, _ = chat.render(A, gpt2, messages[:3], add_generation_prompt=True)
    first = examples[0][0]
    assert prompt[: len(first)] == first
    assert prompt[len(first) :] == gpt2.encode(instruction_prompt({"instruction": "And now?\n\n"
                                               "Tell me in words:  five  spaces."}))  # fmt: skip


def test_a_system_message_replaces_the_preamble_in_every_exchange():
    gpt2 = GPT2Tokenizer()
    messages = [{"role": "system", "content": "Answer like a sailor."}, *EXCHANGES[2][:3]]
    ids, _ = chat.render(A, gpt2, messages, add_generation_prompt=True)
    text = gpt2.decode(ids)
    assert text.startswith("Answer like a sailor.\n\n### Instruction:\nCount the ships.")
    assert text.count("Answer like a sailor.") == 2 and "Below is" not in text
    assert text.endswith(f"{ENDOFTEXT}Answer like a sailor.\n\n### Instruction:\nAnd now?"
                         "\n\nTell me in words:  five  spaces.\n\n### Response:\n")  # fmt: skip


BAD_ORDERS = [
    (
        [{"role": "assistant", "content": "a"}],
        False,
        "messages[0] has role 'assistant', but 'user' comes next",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        True,
        "messages[1] has role 'user', but 'assistant' comes next: an instruction run's",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        False,
        "messages[1] has role 'system', but 'assistant'",
    ),
    (
        [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}],
        False,
        "messages[1] has role 'system', but 'user'",
    ),
    (EXCHANGES[1], True, "messages end with the assistant's message; end them with the user's"),
    (EXCHANGES[1][:1], True, "messages end with the system's message"),
]


@pytest.mark.parametrize("messages, gen, expect", BAD_ORDERS)
def test_messages_out_of_turn_are_one_line_errors(messages, gen, expect):
    with pytest.raises(GptlabError, match=re.escape(expect)) as e:
        chat.render(A, GPT2Tokenizer(), messages, add_generation_prompt=gen)
    assert "\n" not in str(e.value)


def test_the_template_kinds_round_trip_and_old_dicts_read_as_special_tokens():
    for template in (A, T, chat.ChatTemplate(name="mine", bos=False)):
        assert chat.template_from_dict(template.to_dict()) == template
    assert A.to_dict()["kind"] == "instruction" and T.to_dict()["kind"] == "special-tokens"
    old = {k: v for k, v in T.to_dict().items() if k != "kind"}  # written before kinds
    assert chat.template_from_dict(old) == T
    with pytest.raises(GptlabError, match="has kind 'jinja', which this gptlab does not know"):
        chat.template_from_dict({**A.to_dict(), "kind": "jinja"})
    with pytest.raises(GptlabError, match="is of kind 'instruction', not 'special-tokens'"):
        chat.ChatTemplate.from_dict(A.to_dict())
    with pytest.raises(GptlabError, match="malformed: its fields are strings"):
        chat.template_from_dict({"kind": "instruction", "preamble": 3})
    with pytest.raises(GptlabError, match="headers must be non-empty"):
        chat.InstructionTemplate(response_header=" ")


# --------------------------------------------------------------------------- growing a base


def tiny_cfg(vocab: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, context_length=64, emb_dim=16, n_heads=2, n_layers=1, **kw)


@pytest.mark.parametrize("tie", [False, True])
def test_growing_adds_rows_at_the_mean_and_keeps_the_rest(tie, corpus_bpe):
    torch.manual_seed(0)
    cfg = tiny_cfg(corpus_bpe.n_vocab, tie_weights=tie, vocab_multiple=1)
    model = jitter(GPTModel(cfg), 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, tok = chat.ensure_special_tokens(model, corpus_bpe, T)
    V = corpus_bpe.n_vocab
    assert tok.n_vocab == model.cfg.vocab_size == V + 4
    assert [tok.special_id(t) for t in T.special_tokens] == [V, V + 1, V + 2, V + 3]
    emb, head = model.tok_emb.weight, model.out_head.weight
    assert emb.shape == (V + 4, 16) and head.shape == (V + 4, 16)
    assert (head is emb) == tie
    assert torch.equal(emb[:V], before["tok_emb.weight"])
    assert torch.allclose(emb[V:], before["tok_emb.weight"].mean(0).expand(4, -1))
    assert torch.allclose(head[V:], before["out_head.weight"].mean(0).expand(4, -1))
    for k, v in model.state_dict().items():  # everything else untouched
        if k not in ("tok_emb.weight", "out_head.weight"):
            assert torch.equal(v, before[k])
    assert model(torch.tensor([[V + 3, 5]])).shape == (1, 2, V + 4)
    # growing again is a no-op: the same objects back
    assert chat.ensure_special_tokens(model, tok, T) == (model, tok)


def test_growing_uses_spare_padded_rows_first():
    torch.manual_seed(0)
    model = jitter(GPTModel(tiny_cfg(50257, vocab_multiple=64)), 0.1)  # 50304 rows
    rows = model.tok_emb.weight.shape[0]
    model, tok = chat.ensure_special_tokens(model, GPT2Tokenizer(), T)
    assert model.tok_emb.weight.shape[0] == rows == 50304 and model.cfg.vocab_size == 50261
    w = model.tok_emb.weight
    assert torch.allclose(w[50257:50261], w[:50257].mean(0).expand(4, -1))
    assert not w[50261:].any()  # the remaining padding stays zero


def test_a_template_with_other_tokens_grows_a_grown_tokenizer_without_moving_ids():
    model = GPTModel(tiny_cfg(50257))
    model, tok = chat.ensure_special_tokens(model, GPT2Tokenizer(), T)
    other = chat.ChatTemplate(name="other", user="<|human|>", assistant="<|bot|>")
    model, tok2 = chat.ensure_special_tokens(model, tok, other)
    assert [tok2.special_id(t) for t in T.special_tokens] == [50257, 50258, 50259, 50260]
    assert tok2.special_id("<|human|>") == 50261 and tok2.special_id("<|bot|>") == 50262
    assert model.cfg.vocab_size == 50263


def test_growth_off_is_a_one_line_error_naming_the_fix():
    model = GPTModel(tiny_cfg(50257))
    rows = model.tok_emb.weight.clone()
    with pytest.raises(
        GptlabError, match=r"lacks .* <\|system\|>, <\|user\|>.*; --finetune\.x on"
    ) as e:
        chat.ensure_special_tokens(model, GPT2Tokenizer(), T, grow=False, fix="--finetune.x on")
    assert "\n" not in str(e.value)
    assert model.cfg.vocab_size == 50257 and torch.equal(model.tok_emb.weight, rows)


def test_a_wrapped_model_cannot_grow():
    model = torch.nn.Sequential(GPTModel(tiny_cfg(50257)))
    with pytest.raises(GptlabError, match="cannot add .* to a Sequential"):
        chat.ensure_special_tokens(model, GPT2Tokenizer(), T)


def test_a_grown_tokenizer_reloads_from_its_identity(corpus_bpe):
    for base in (GPT2Tokenizer(), corpus_bpe, CharTokenizer("abc ")):
        tok = WithSpecialTokens(base, T.special_tokens)
        ident = json.loads(json.dumps(tok.identity()))
        again = from_identity(ident)
        assert isinstance(again, WithSpecialTokens) and again.added == tok.added
        assert again.n_vocab == base.n_vocab + 4
        ids, _ = chat.render(T, again, [{"role": "user", "content": "a cab"}])
        assert again.decode(ids) == f"{ENDOFTEXT}<|user|>a cab<|end|>"
        lengths = token_byte_lengths(again)
        assert lengths.shape == (again.n_vocab,) and not lengths[base.n_vocab :].any()
    with pytest.raises(GptlabError, match="added_special"):
        from_identity({"type": "gpt2", "added_special": "oops"})


# --------------------------------------------------------------------------- with the run


def make_run(path, tokenizer, template=chat.DEFAULT, seed=0, in_meta=False):
    """A one-checkpoint run whose base was grown by `template`'s tokens."""
    torch.manual_seed(seed)
    model = jitter(GPTModel(tiny_cfg(tokenizer.n_vocab)), 0.2)
    model, tok = chat.ensure_special_tokens(model, tokenizer, template)
    meta = {"config": RunConfig(model=model.cfg).to_dict(), "tokenizer": tok.identity()}
    if in_meta:
        meta["chat_template"] = template.to_dict()
    else:
        chat.save_template(path, template)
    ckpt_lib.save_checkpoint(path, 1, model, meta)
    return model, tok


@pytest.mark.parametrize("in_meta", [False, True])
def test_the_template_and_grown_vocab_travel_with_the_run(tmp_path, in_meta):
    tmpl = chat.ChatTemplate(name="mine", end="<|eot|>", bos=False)
    model, tok = make_run(tmp_path / "run", GPT2Tokenizer(), tmpl, in_meta=in_meta)
    run = open_run(tmp_path / "run", "cpu")
    assert run.chat_template == tmpl
    assert run.tokenizer.identity() == tok.identity() and run.model.cfg.vocab_size == 50261
    x = torch.tensor([[50257, 50260, 11]])
    assert torch.equal(run.model(x), model.eval()(x))
    ckpt = ckpt_lib.latest_checkpoint(tmp_path / "run")
    assert chat.load_template(ckpt) == tmpl and chat.load_template(tmp_path / "run") == (
        None if in_meta else tmpl
    )


def test_a_base_run_has_no_template(tmp_path):
    model = GPTModel(tiny_cfg(50257))
    meta = {"config": RunConfig(model=model.cfg).to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(tmp_path / "run", 1, model, meta)
    assert open_run(tmp_path / "run", "cpu").chat_template is None


def test_a_damaged_template_file_is_a_one_line_error(tmp_path):
    (tmp_path / chat.TEMPLATE_FILE).write_text("{not json")
    with pytest.raises(GptlabError, match="is unreadable"):
        chat.load_template(tmp_path)
    (tmp_path / chat.TEMPLATE_FILE).write_text(json.dumps({"format": "x"}))
    with pytest.raises(GptlabError, match="not a gptlab chat template"):
        chat.load_template(tmp_path)
    body = {"format": chat.FORMAT, "template": {"user": 3}}
    (tmp_path / chat.TEMPLATE_FILE).write_text(json.dumps(body))
    with pytest.raises(GptlabError, match="malformed"):
        chat.load_template(tmp_path)


def test_a_run_whose_template_names_tokens_its_tokenizer_lacks_is_refused(tmp_path):
    make_run(tmp_path / "run", GPT2Tokenizer())
    chat.save_template(tmp_path / "run", chat.ChatTemplate(user="<|human|>"))
    with pytest.raises(GptlabError, match=r"<\|human\|>.*lacks"):
        open_run(tmp_path / "run", "cpu")


@pytest.mark.parametrize("in_meta", [False, True])
def test_an_instruction_template_travels_with_the_run_and_grows_nothing(tmp_path, in_meta):
    make_run(tmp_path / "run", GPT2Tokenizer(), A, in_meta=in_meta)
    run = open_run(tmp_path / "run", "cpu")
    assert run.chat_template == A and run.model.cfg.vocab_size == 50257
    if not in_meta:
        saved = json.loads((tmp_path / "run" / chat.TEMPLATE_FILE).read_text())
        assert saved["template"]["kind"] == "instruction" and saved["special_tokens"] == []
        assert saved["chat_template"] == A.jinja()


def test_an_instructions_run_that_saved_no_template_chats_in_the_alpaca_prompt(tmp_path):
    """A run finetuned on instructions before runs kept their template: its checkpoint's
    config names the format, and the prompt every such run learned is ALPACA."""
    model = GPTModel(tiny_cfg(50257))
    cfg = RunConfig(model=model.cfg)
    cfg.finetune.format = "instructions"
    meta = {"config": cfg.to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(tmp_path / "run", 1, model, meta)
    assert open_run(tmp_path / "run", "cpu").chat_template == A
    assert chat.load_template(tmp_path / "run") is None  # the run directory has no meta.json


# --------------------------------------------------------------------------- Hugging Face


def hf_ids(folder, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_apply_chat_template_on_the_exported_folder_gives_our_ids(kind, tmp_path, corpus_bpe):
    pytest.importorskip("transformers")
    from gptlab.interop.hf import convert_to_hf

    base = GPT2Tokenizer() if kind == "gpt2" else corpus_bpe
    _, tok = make_run(tmp_path / "run", base)
    names = convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert "chat_template.jinja" in names
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.DEFAULT.jinja()
    for messages in CONVERSATIONS:
        for gen in (False, True):
            if gen and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            ids, mask = chat.render(T, tok, messages, add_generation_prompt=gen)
            assert hf_ids(tmp_path / "hf", messages, gen) == (ids, mask)
    # the exported tokenizer knows the turn tokens by the run's ids
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.convert_tokens_to_ids(list(T.special_tokens)) == [
        tok.special_id(t) for t in T.special_tokens
    ]
    assert hf_tok.decode(ids, skip_special_tokens=True) == "".join(m["content"] for m in messages)


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_apply_chat_template_gives_the_instruction_templates_ids(kind, tmp_path, corpus_bpe):
    pytest.importorskip("transformers")
    from jinja2.exceptions import TemplateError

    from gptlab.interop.hf import convert_to_hf

    base = GPT2Tokenizer() if kind == "gpt2" else corpus_bpe
    _, tok = make_run(tmp_path / "run", base, A)
    names = convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert "chat_template.jinja" in names
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == A.jinja() and "additional_special_tokens" not in config
    for messages in EXCHANGES:
        for gen in (False, True):
            if gen and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            assert hf_ids(tmp_path / "hf", messages, gen) == chat.render(A, tok, messages, gen)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for messages, gen, _ in BAD_ORDERS:  # refused there too
        with pytest.raises(TemplateError, match="instruction run's chat|end the messages"):
            hf_tok.apply_chat_template(messages, add_generation_prompt=gen)
