"""`gptlab serve` through the official `openai` client and raw HTTP: answers equal
`gptlab generate` / `generate` for the same settings, streaming and not; hostile requests
get OpenAI-shaped 4xx errors; concurrent and vanishing clients do not disturb the others.

The model is a tiny random GPT-2-shaped one in float64 (so batching cannot flip a greedy
choice), served by uvicorn on a thread, on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import jitter

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from gptlab.cli.main import main  # noqa: E402
from gptlab.config.schema import ModelConfig, RunConfig  # noqa: E402
from gptlab.data.tokenizer import GPT2Tokenizer  # noqa: E402
from gptlab.infer.sampling import generate  # noqa: E402
from gptlab.infer.serve import ServerThread, build  # noqa: E402
from gptlab.interop.runs import Run, open_run  # noqa: E402
from gptlab.model.gpt import GPTModel  # noqa: E402

CTX = 512


@pytest.fixture(scope="module")
def run() -> Run:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50257, context_length=CTX, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0
    )
    model = jitter(GPTModel(cfg).double().eval(), 0.2)
    return Run(model, GPT2Tokenizer(), RunConfig(model=cfg), torch.device("cpu"), None)


@pytest.fixture(scope="module")
def server(run):
    app, engine = build(run, max_batch=8)
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference(run: Run, prompt: str, n: int, stop=(), **sampling) -> str:
    """What `generate` gives the prompt alone, cut at <|endoftext|> and before the first stop
    string (greedy unless `sampling` says otherwise)."""
    sampling.setdefault("temperature", 0.0)
    tok = run.tokenizer
    ids = tok.encode(prompt)
    out = generate(
        run.model, torch.tensor([ids]), n, eos_id=tok.eot_token, vocab_limit=tok.n_vocab, **sampling
    )
    text = tok.decode(out[0, len(ids) :].tolist())
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["gpt2"]
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == 8


def test_greedy_completion_equals_generate(client, run):
    r = client.completions.create(
        model="any", prompt="Every effort moves you", max_tokens=12, temperature=0
    )
    assert r.choices[0].text == reference(run, "Every effort moves you", 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 12)
    assert r.object == "text_completion"


def test_stream_equals_the_whole_answer(client, run):
    stream = client.completions.create(
        model="any", prompt="The lighthouse", max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 1  # it came in pieces
    assert "".join(c.choices[0].text for c in chunks) == reference(run, "The lighthouse", 20)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_several_prompts_n_and_stop_strings(client, run):
    prompts = ["One", "Two words", "A longer third prompt here"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=10, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        assert c.text == reference(run, prompts[c.index // 2], 10)
    whole = reference(run, "One", 10)
    stop = whole[3:6]  # a stop string the continuation surely contains
    r = client.completions.create(model="m", prompt="One", max_tokens=10, temperature=0, stop=stop)
    assert r.choices[0].text == whole[: whole.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling_and_matches_generate(client, run):
    def ask(seed):
        r = client.completions.create(
            model="m",
            prompt="Rain fell",
            max_tokens=15,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            n=2,
        )
        return [c.text for c in r.choices]

    first = ask(7)
    assert first == ask(7)
    assert first != ask(8)
    assert first[0] != first[1]  # choice i samples with seed + i
    assert first[1] == ask(8)[0]
    assert first[0] == reference(run, "Rain fell", 15, temperature=1.0, top_p=0.95, seed=7)


def test_chat_renders_the_template_and_streams(client, run):
    messages = [
        {"role": "system", "content": "A play in one act."},
        {"role": "user", "content": "Who goes there?"},
    ]
    prompt = "A play in one act.\n\nUSER:\nWho goes there?\n\nASSISTANT:\n"
    want = reference(run, prompt, 25, stop=("\n\n",))
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    stream = client.chat.completions.create(
        model="m", messages=messages, max_tokens=25, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_the_cli_generate_gives_the_served_tokens(tiny_run, capsys):
    """A trained run from disk: `gptlab generate` greedy and the server agree."""
    main(["generate", "--checkpoint", str(tiny_run), "--prompt", "Every effort", "--temperature",
          "0", "--max-new-tokens", "10", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out.rstrip("\n")
    app, engine = build(open_run(tiny_run, "cpu"), max_batch=2)
    try:
        with ServerThread(app) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            r = c.completions.create(model="m", prompt="Every effort", max_tokens=10, temperature=0)
            run_view = request(srv, "GET", "/v1/run")[1]
    finally:
        engine.close()
    assert "Every effort" + r.choices[0].text == printed
    assert run_view["training"] is False
    assert {r["event"] for r in run_view["records"]} >= {"train", "eval", "end"}


# --------------------------------------------------------------------------- raw HTTP


def request(server, method, path, body=None, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(
        method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


GOOD = {"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
BAD = [
    ("/v1/completions", None, b"{not json"),
    ("/v1/completions", None, b"[1, 2, 3]"),
    ("/v1/completions", None, b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/completions", None, b"[" * 200_000 + b"]" * 200_000),
    ("/v1/completions", None, b'{"prompt": "' + b"a" * (2 << 20) + b'"}'),
    ("/v1/completions", {"max_tokens": 3}, None),
    ("/v1/completions", {"prompt": 5}, None),
    ("/v1/completions", {"prompt": []}, None),
    ("/v1/completions", {"prompt": [[1, 2], "x", 3.5]}, None),
    ("/v1/completions", {"prompt": "word " * (CTX + 10)}, None),
    ("/v1/completions", {"prompt": [1, 2, 99999999]}, None),
    ("/v1/completions", {**GOOD, "temperature": 5}, None),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, None),
    ("/v1/completions", {**GOOD, "top_p": 0}, None),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, None),
    ("/v1/completions", {**GOOD, "top_k": -1}, None),
    ("/v1/completions", {**GOOD, "top_k": 2.5}, None),
    ("/v1/completions", {**GOOD, "n": 0}, None),
    ("/v1/completions", {**GOOD, "n": 10_000}, None),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, None),
    ("/v1/completions", {**GOOD, "max_tokens": "10"}, None),
    ("/v1/completions", {**GOOD, "max_tokens": True}, None),
    ("/v1/completions", {**GOOD, "stop": 5}, None),
    ("/v1/completions", {**GOOD, "stop": ["a"] * 10}, None),
    ("/v1/completions", {**GOOD, "seed": -1}, None),
    ("/v1/completions", {**GOOD, "stream": "yes"}, None),
    ("/v1/completions", {**GOOD, "echo": True}, None),
    ("/v1/completions", {**GOOD, "logprobs": 5}, None),
    ("/v1/completions", {**GOOD, "model": 123}, None),
    ("/v1/completions", {**GOOD, "stream_options": "all"}, None),
    ("/v1/chat/completions", {"model": "m"}, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, None),
    ("/v1/chat/completions", {"messages": "hello"}, None),
]


def test_hostile_requests_get_openai_shaped_4xx_and_the_server_goes_on(server, run):
    failures = []
    cases = [("POST", path, body, raw) for path, body, raw in BAD] + [
        ("GET", "/v1/no-such-endpoint", None, None),
        ("GET", "/v1/completions", None, None),
        ("GET", "/static/../../../etc/passwd", None, None),
        ("GET", "/static/%2e%2e/%2e%2e/etc/passwd", None, None),
    ]
    for method, path, body, raw in cases:
        status, answer = request(server, method, path, body, raw=raw)
        err = answer.get("error") if isinstance(answer, dict) else None
        ok = 400 <= status < 500 and isinstance(err, dict) and isinstance(err.get("message"), str)
        if not (ok and {"type", "param", "code"} <= set(err)):
            failures.append((method, path, str(body)[:60], status, str(answer)[:120]))
    assert failures == []
    assert len(cases) >= 20
    status, answer = request(server, "POST", "/v1/completions", GOOD)
    assert status == 200 and answer["choices"][0]["text"] == reference(run, "Hello", 3)


def test_max_tokens_is_capped_to_the_context(server):
    prompt = [318] * (CTX - 4)  # token ids
    status, answer = request(
        server, "POST", "/v1/completions", {**GOOD, "prompt": prompt, "max_tokens": 100}
    )
    assert status == 200
    usage = answer["usage"]
    assert usage["prompt_tokens"] == CTX - 4
    assert usage["completion_tokens"] <= 5  # the context holds CTX - 4 + 5 - 1 positions


def test_api_key_guards_every_endpoint_but_health(run):
    app, engine = build(run, max_batch=2, api_key="s3cret")
    try:
        with ServerThread(app) as srv:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", GOOD), ("GET", "/v1/run", None)):  # fmt: skip
                    status, answer = request(srv, method, path, body, headers)
                    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert request(srv, "GET", "/health")[0] == 200
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
            assert c.completions.create(**GOOD).choices[0].text
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        engine.close()


# --------------------------------------------------------------------------- concurrency


def test_32_concurrent_streams_finish_complete_and_correct(client, run):
    prompts = [f"Story number {i} begins" + " and then" * (i % 5) for i in range(32)]
    lengths = [5 + (7 * i) % 30 for i in range(32)]

    def stream(i):
        s = client.completions.create(
            model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in s)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(stream, range(32)))
    want = [reference(run, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert got == want


def test_a_client_that_vanishes_mid_stream_frees_its_slot(client, server, run):
    engine = server.engine
    body = {**GOOD, "prompt": "Gone", "max_tokens": CTX - 10, "stream": True}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(6) == b"data: "  # it streams
    gen = next(g for g in list(engine.running) if g.prompt == run.tokenizer.encode("Gone"))
    conn.sock.close()  # the client dies mid-stream
    conn.close()
    # meanwhile others are served, and correctly
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda i: client.completions.create(model="m", prompt=f"Still {i}",
                                max_tokens=8, temperature=0).choices[0].text, range(4)))  # fmt: skip
    assert texts == [reference(run, f"Still {i}", 8) for i in range(4)]
    deadline = time.monotonic() + 20  # the server notices the closed socket at its next write
    while gen.slot != -1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gen.cancelled and gen.slot == -1
    assert gen.tokens < CTX - 10  # it stopped early


def test_serve_on_port_0_takes_a_free_port_and_names_it(tiny_run):
    """`gptlab serve --port 0`: the OS picks the port and the first line says which, so a
    script never races another program for a port it chose."""
    cmd = [sys.executable, "-m", "gptlab", "serve", "--checkpoint", str(tiny_run), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            first = proc.stdout.readline()  # printed once the socket listens
            url = re.search(r"at (http://127\.0\.0\.1:(\d+))", first)
            assert url and int(url.group(2)) > 0, first
            with urllib.request.urlopen(url.group(1) + "/health", timeout=30) as r:
                assert r.status == 200
        finally:
            proc.terminate()
