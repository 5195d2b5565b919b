"""`gptlab serve` on a chat-finetuned run: /v1/chat/completions renders the run's chat
template and the reply ends at its end-of-turn id, which never shows in the text; the
answer equals greedy decoding of the rendered prompt written out plainly, streamed or not.

The model is a tiny random one in float64, grown by the template's tokens
(`chat.ensure_special_tokens`); its head row for `<|end|>` is set to a slightly scaled copy
of the row of the token greedy picks a few steps in, so the reply reaches the end id early.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import jitter

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from gptlab.cli.main import main  # noqa: E402
from gptlab.config.schema import ModelConfig, RunConfig  # noqa: E402
from gptlab.data import chat  # noqa: E402
from gptlab.data.tokenizer import GPT2Tokenizer  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.infer.chat import Conversation, chat_prompt, render_plays  # noqa: E402
from gptlab.infer.engine import Engine, Sampling  # noqa: E402
from gptlab.infer.serve import ServerThread, build  # noqa: E402
from gptlab.interop.runs import Run  # noqa: E402
from gptlab.model.gpt import GPTModel  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Zembla?"},
]


def greedy(model, ids: list[int], n: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """Plain greedy decoding, no cache: the ids before the first stop id, and whether one came."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt in stop_ids:
                return out, True
            out.append(nxt)
    return out, False


@pytest.fixture(scope="module")
def run() -> Run:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0
    )
    model = jitter(GPTModel(cfg).double().eval(), 0.2)
    model, tok = chat.ensure_special_tokens(model, GPT2Tokenizer(), chat.DEFAULT)
    model.eval()
    ids, _ = chat.render(chat.DEFAULT, tok, MESSAGES, add_generation_prompt=True)
    free, _ = greedy(model, ids, 6, set())
    with torch.no_grad():  # make <|end|> win where greedy would pick free[4]
        head = model.out_head.weight
        head[chat.DEFAULT.end_id(tok)] = head[free[4]] * 1.05
    return Run(model, tok, RunConfig(model=model.cfg), torch.device("cpu"), None, chat.DEFAULT)


@pytest.fixture(scope="module")
def client(run):
    app, engine = build(run, max_batch=4)
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    engine.close()


def test_chat_uses_the_runs_template_and_stops_at_the_end_of_turn(client, run):
    tok = run.tokenizer
    ids, _ = chat.render(chat.DEFAULT, tok, MESSAGES, add_generation_prompt=True)
    end = chat.DEFAULT.end_id(tok)
    want_ids, ended = greedy(run.model, ids, 40, {end, 50256})
    assert ended and 1 <= len(want_ids) < 40  # the reference itself reached <|end|>
    want = tok.decode(want_ids)
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop"
    assert "<|end|>" not in r.choices[0].message.content
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want_ids) + 1  # the end id was sampled
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=40, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_bad_role_is_a_400_in_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="m", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4
        )
    err = e.value.body
    assert e.value.status_code == 400
    assert "wizard" in err["message"] and err["param"] == "messages"
    assert err["type"] == "invalid_request_error"


def _generate_chat(monkeypatch, capsys, run, *flags: str) -> str:
    monkeypatch.setattr("gptlab.interop.runs.open_run", lambda *a, **k: run)
    capsys.readouterr()
    assert main(["generate", "--chat", "--temperature", "0", "--max-new-tokens", "40", *flags]) == 0
    return capsys.readouterr().out


def test_generate_chat_one_shot_is_the_servers_reply(client, run, monkeypatch, capsys):
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, temperature=0)
    out = _generate_chat(
        monkeypatch, capsys, run, "--system", "Be brief.", "--prompt", MESSAGES[1]["content"]
    )
    assert out == r.choices[0].message.content + "\n"


def test_generate_chat_re_renders_the_history_each_turn(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nAnd again?\n"))  # not a tty
    first, second = _generate_chat(monkeypatch, capsys, run).splitlines()
    tok, end = run.tokenizer, chat.DEFAULT.end_id(run.tokenizer)
    history = [{"role": "user", "content": "Hi there"}]
    ids, _ = chat.render(chat.DEFAULT, tok, history, add_generation_prompt=True)
    assert first == tok.decode(greedy(run.model, ids, 40, {end, 50256})[0])
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And again?"}]
    ids, _ = chat.render(chat.DEFAULT, tok, history, add_generation_prompt=True)
    assert second == tok.decode(greedy(run.model, ids, 40, {end, 50256})[0])


def test_generate_chat_on_a_base_model_uses_the_plays_template(monkeypatch, capsys):
    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0
    )
    model = jitter(GPTModel(cfg).double().eval(), 0.2)
    base = Run(model, GPT2Tokenizer(), RunConfig(model=cfg), torch.device("cpu"), None)
    out = _generate_chat(monkeypatch, capsys, base, "--prompt", "Who goes there?")
    prompt = "USER:\nWho goes there?\n\nASSISTANT:\n"
    assert prompt == render_plays([{"role": "user", "content": "Who goes there?"}])
    ids = base.tokenizer.encode(prompt)
    reply, _ = greedy(model, ids, 40, {50256})
    text = base.tokenizer.decode(reply)
    want = text[: text.find("\n\n")] if "\n\n" in text else text  # the plays' stop
    assert out == want + "\n"


def test_a_conversation_drops_its_oldest_exchanges_when_the_context_fills(run):
    tok = run.tokenizer
    conv = Conversation(Engine(run.model, tok), chat.DEFAULT, "Be brief.", Sampling(8, 0.0))
    question = "Tell me about the island of Zembla, its capital and its harbour."
    replies = ["".join(conv.reply(question)) for _ in range(10)]
    messages = [{"role": "system", "content": "Be brief."}, *conv.history]
    assert conv.history[-2:] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": replies[-1]},
    ]
    assert len(conv.history) < 20  # the oldest exchanges were dropped
    assert len(chat_prompt(chat.DEFAULT, tok, messages[:-1]).ids) <= 128
    with pytest.raises(GptlabError, match="longer than the context window"):
        list(conv.reply("Zembla " * 200))


def test_system_without_chat_is_one_line(capsys):
    assert main(["generate", "--system", "Be brief."]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
