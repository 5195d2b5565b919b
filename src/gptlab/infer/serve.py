"""`gptlab serve`: a trained model behind an OpenAI-compatible HTTP API, with a page.

Endpoints (shapes as OpenAI's, so the official `openai` client and curl work unchanged):

- `GET /v1/models`: the one model served.
- `POST /v1/completions`: prompt (text, a list of texts, or token ids), max_tokens,
  temperature, top_p, top_k (an extension), stop, seed, n, stream (server-sent events
  ending in `data: [DONE]`), usage counts.
- `POST /v1/chat/completions`: the messages rendered by the run's chat template (a model
  from `gptlab finetune`: `gptlab.data.chat`, the reply ends at its end-of-turn token), or for a
  base model by CHAT_TEMPLATE (below); streaming too.
- `GET /v1/run`: the run's config, its chat template (null for a base model) and its
  metrics.jsonl records: what the page needs to choose its views and draw the run view.
- `GET /health`: liveness and load, the one endpoint that needs no key.
- `GET /`: the page (a chat for a run with a chat template, a playground, a run view),
  shipped in gptlab/infer/static, no network needed.

The base models' chat template suits a model trained on plays: each message is a speech, its
speaker's name in capitals on a line of its own (`USER:`, `ASSISTANT:`), speeches apart by
a blank line, system messages as plain paragraphs; the prompt ends with `ASSISTANT:` and a
newline, and the reply ends at the first blank line (where the next speaker would begin).

Safety: binds 127.0.0.1 unless told otherwise; with an API key every endpoint but
`/health` and the page's own files needs `Authorization: Bearer KEY`. Every request is
validated (bodies over 1 MiB, malformed JSON, wrong types, out-of-range values, prompts
longer than the context) and answered with a 4xx error in OpenAI's shape; no field names
a file; max_tokens is capped to what the context window holds.

The model runs in `gptlab.infer.engine.Engine` (continuous batching) on its own thread; each
request's events cross to the event loop through an asyncio queue. A client that goes
away mid-stream cancels its generations, which frees their slots before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gptlab.data.chat import PLAYS_SPEAKERS, PLAYS_STOP, end_id, render, render_plays
from gptlab.data.tokenizer import ENDOFTEXT, eot_id
from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, Event, Sampling
from gptlab.interop.runs import Run
from gptlab.observe.metrics import read_metrics

MAX_BODY = 1 << 20  # bytes: far above any prompt a context window holds
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, all prompts together
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256
SPEAKERS = PLAYS_SPEAKERS
CHAT_STOP = PLAYS_STOP  # a speech ends at a blank line, before the next speaker's name
CHAT_TEMPLATE = "{system}\n\nUSER:\n{user}\n\nASSISTANT:\n{assistant}\n\nUSER:\n...\n\nASSISTANT:\n"
RUN_EVENTS = {"start", "train", "eval", "tasks", "sample", "checkpoint", "end"}  # for the run view
PAGE_FILES = {  # the page's files: a fixed list, no request names a path
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


class ApiError(Exception):
    """A request the server refuses, in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = (
            message,
            status,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# --------------------------------------------------------------------------- validation


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    """body[name] if present and not null, checked to be one of `kinds` (bool is no number)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(f"{name} must be {what}, got {json.dumps(value)[:40]}", param=name)
    return value


def _number(
    body: dict, name: str, default: Any, low: float, high: float, integer: bool = False
) -> Any:
    kinds = (int,) if integer else (int, float)
    what = f"{'an integer' if integer else 'a number'} from {low} to {high}"
    value = _get(body, name, kinds, default, what)
    if value is not default and (not math.isfinite(value) or not low <= value <= high):
        raise ApiError(f"{name} must be {what}, got {value}", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(
            f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    return tuple(s for s in stops if s)


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer in ways this server does not do: refused
    rather than silently ignored (defaults, like echo=false, pass)."""
    for name, neutral in (("echo", False), ("logprobs", False), ("suffix", ""), ("tools", [])):
        if body.get(name) not in (None, neutral):
            raise ApiError(f"{name} is not supported by gptlab serve", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(f"{name} is not supported by gptlab serve; leave it 0", param=name)


@dataclass(frozen=True)
class Job:
    """One choice to generate: which prompt it continues, and how."""

    index: int  # the choice's index in the response
    prompt: int  # which prompt (for usage: each prompt counts once)
    ids: list[int]
    sampling: Sampling


@dataclass(frozen=True)
class Parsed:
    jobs: list[Job]
    prompt_tokens: int
    stream: bool
    include_usage: bool


# --------------------------------------------------------------------------- the server


class Server:
    """The endpoints, over one loaded run and its engine."""

    def __init__(self, run: Run, engine: Engine, api_key: str | None = None):
        self.run = run
        self.engine = engine
        self.tokenizer = run.tokenizer
        self.context = run.config.model.context_length
        self.api_key = api_key
        self.run_dir = _run_dir(run)
        self.model_name = (self.run_dir or run.checkpoint or Path("gpt2")).name or "gptlab"
        self.started = int(time.time())

    # ------------------------------------------------------------------ requests -> jobs

    def encode_prompts(self, prompt: Any) -> list[list[int]]:
        """A completion's prompt (text, texts, ids, or lists of ids) -> token ids per prompt."""
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise ApiError(
                "prompt must be a string, a list of strings or token ids", param="prompt"
            )
        if len(prompts) > MAX_CHOICES:
            raise ApiError(f"at most {MAX_CHOICES} prompts per request", param="prompt")
        return [self._ids(p) for p in prompts]

    def _ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allowed_special={ENDOFTEXT})
            if not ids:  # an empty prompt starts a new document, as GPT-2 was trained to
                eos = eot_id(self.tokenizer)
                if eos is None:
                    raise ApiError("prompt is empty; give some text to continue", param="prompt")
                ids = [eos]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            if not all(0 <= t < self.engine.vocab_limit for t in prompt):
                raise ApiError(
                    f"token ids must be from 0 to {self.engine.vocab_limit - 1}", param="prompt"
                )
            ids = list(prompt)
        else:
            raise ApiError("each prompt must be a string or a list of token ids", param="prompt")
        if len(ids) > self.context:
            raise ApiError(
                f"the prompt is {len(ids)} tokens, longer than the model's context window of "
                f"{self.context}; shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def parse(
        self,
        body: dict,
        prompts: list[list[int]],
        stop: tuple[str, ...],
        default_max: int,
        stop_ids: tuple[int, ...] = (),
    ) -> Parsed:
        """The sampling fields common to completions and chat -> the jobs to run."""
        _refuse_unsupported(body)
        _get(body, "model", (str,), "", "a string")
        max_tokens = _number(body, "max_tokens", None, 1, 1 << 30, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", default_max, 1, 1 << 30, True)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise ApiError("top_p must be above 0 (and at most 1)", param="top_p")
        top_k = _number(body, "top_k", 0, 0, 1 << 30, integer=True)
        seed = _number(body, "seed", None, 0, 2**63 - 1 - MAX_CHOICES, integer=True)
        n = _number(body, "n", 1, 1, MAX_N, integer=True)
        stream = _get(body, "stream", (bool,), False, "true or false")
        options = _get(body, "stream_options", (dict,), {}, "an object")
        include_usage = _get(options, "include_usage", (bool,), False, "true or false")
        if len(prompts) * n > MAX_CHOICES:
            raise ApiError(
                f"at most {MAX_CHOICES} choices (prompts times n) per request", param="n"
            )
        base = Sampling(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p) if top_p < 1 else None,
            top_k=top_k or None,
            stop=stop,
            stop_ids=stop_ids,
        )
        jobs = []
        for p, ids in enumerate(prompts):
            room = self.context - len(ids) + 1  # the last token sampled is never fed back
            for i in range(n):
                index = p * n + i
                choice_seed = None if seed is None else seed + index  # choice i: seed + i
                sampling = replace(base, max_tokens=min(max_tokens, room), seed=choice_seed)
                jobs.append(Job(index, p, ids, sampling))
        return Parsed(jobs, sum(len(ids) for ids in prompts), stream, include_usage)

    # ------------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        body = await _json_body(request)
        if "prompt" not in body:
            raise ApiError("prompt is required", param="prompt")
        prompts = self.encode_prompts(body["prompt"])
        parsed = self.parse(body, prompts, _stop(body), default_max=16)
        return await self._respond(parsed, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await _json_body(request)
        template = self.run.chat_template
        if template is None:  # a base model: the plays-style text template
            text = render_chat(body.get("messages"))
            stop = (CHAT_STOP, *_stop(body))
            parsed = self.parse(body, [self._ids(text)], stop, default_max=self.context)
            return await self._respond(parsed, chat=True)
        messages = chat_messages(body.get("messages"))
        try:
            ids, _ = render(template, self.tokenizer, messages, add_generation_prompt=True)
        except GptlabError as e:
            raise ApiError(str(e), param="messages") from None
        end = (end_id(self.tokenizer, template),)
        parsed = self.parse(body, [self._ids(ids)], _stop(body), self.context, stop_ids=end)
        return await self._respond(parsed, chat=True)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, **self.engine.load()})

    async def run_info(self, request: Request) -> Response:
        """The run's config, chat template and metrics records: the page offers its chat
        view only where `chat_template` is not null, and draws the run view from the rest."""
        records: list[dict] = []
        metrics = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if metrics is not None and metrics.is_file():
            records = await asyncio.to_thread(read_metrics, metrics)
            records = [r for r in records if r.get("event") in RUN_EVENTS]
        last = next((r["event"] for r in reversed(records) if r["event"] in ("start", "end")), None)
        template = self.run.chat_template
        return JSONResponse(
            {
                "model": self.model_name,
                "checkpoint": self.run.checkpoint.name if self.run.checkpoint else None,
                "config": self.run.config.to_dict(),
                "chat_template": template.to_dict() if template is not None else None,
                "training": last == "start",
                "records": records,
            }
        )

    async def page(self, request: Request) -> Response:
        name, media = PAGE_FILES[request.url.path]
        text = resources.files("gptlab.infer").joinpath("static", name).read_text(encoding="utf-8")
        return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "gptlab",
            "context_length": self.context,
        }

    # ------------------------------------------------------------------ answers

    async def _respond(self, parsed: Parsed, chat: bool) -> Response:
        kind = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        events = _run_jobs(self.engine, parsed.jobs)
        if parsed.stream:
            chunks = _sse_chunks(events, parsed, head, chat)
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts: dict[int, list[str]] = {job.index: [] for job in parsed.jobs}
        finish, tokens = {}, {}
        try:
            async for index, event in events:
                if event.finish_reason == "error":
                    raise ApiError(event.text, status=500, kind="server_error")
                texts[index].append(event.text)
                if event.finish_reason is not None:
                    finish[index], tokens[index] = event.finish_reason, event.completion_tokens
        finally:
            await events.aclose()  # cancels what still runs
        choices = []
        for index in sorted(texts):
            text = "".join(texts[index])
            content = (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            choices.append(
                {"index": index, **content, "finish_reason": finish[index], "logprobs": None}
            )
        usage = _usage(parsed.prompt_tokens, sum(tokens.values()))
        return JSONResponse({**head, "choices": choices, "usage": usage})

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def guard(self, endpoint: Callable, needs_key: bool = True) -> Callable:
        """The endpoint behind the key check, with refusals as OpenAI-shaped errors."""

        async def guarded(request: Request) -> Response:
            if needs_key and not self._authorized(request):
                return ApiError(
                    "missing or wrong API key; send the header Authorization: Bearer KEY",
                    status=401,
                    code="invalid_api_key",
                ).response()
            try:
                return await endpoint(request)
            except ApiError as e:
                return e.response()

        return guarded


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def render_chat(messages: Any) -> str:
    """Chat messages -> the prompt text of the base models' template (`chat.render_plays`;
    the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", *SPEAKERS):
            raise ApiError(
                f"messages[{i}] must be an object with role system, user or assistant",
                param="messages",
            )
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _message_text(m.get("content"), i)})
    return render_plays(clean)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages for a run's chat template: content parts joined into one string (kept
    as sent: the template saw training text unstripped), OpenAI's "developer" role taken
    as "system"; other roles are refused by the template."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object with role and content", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": _message_text(m.get("content"), i, strip=False)})
    return out


def _message_text(content: Any, i: int, strip: bool = True) -> str:
    """A message's content: a string, or a list of text parts (as OpenAI allows)."""
    if isinstance(content, str):
        return content.strip() if strip else content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        text = "".join(p["text"] for p in content)
        return text.strip() if strip else text
    raise ApiError(
        f"messages[{i}].content must be a string or a list of text parts", param="messages"
    )


async def _json_body(request: Request) -> dict:
    """The request's JSON object, read with a size cap."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise ApiError(f"request body over {MAX_BODY} bytes", status=413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(f"request body over {MAX_BODY} bytes", status=413)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


async def _run_jobs(engine: Engine, jobs: list[Job]) -> AsyncIterator[tuple[int, Event]]:
    """Submit the jobs and yield (choice index, event) as they come, until all finish.
    Leaving early (the client went away: the task is cancelled) cancels what still runs."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def deliver(index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        return on_event

    gens = [engine.submit(job.ids, job.sampling, deliver(job.index)) for job in jobs]
    try:
        remaining = len(gens)
        while remaining:
            index, event = await queue.get()
            remaining -= event.finish_reason is not None
            yield index, event
    finally:
        for gen in gens:
            if not gen.finished:
                engine.cancel(gen)


async def _sse_chunks(
    events: AsyncIterator[tuple[int, Event]], parsed: Parsed, head: dict, chat: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes, ending with `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    if chat:  # the role comes first, as OpenAI sends it
        for job in parsed.jobs:
            yield chunk(job.index, None, None, role=True)
    completion_tokens = 0
    try:
        async for index, event in events:
            if event.finish_reason == "error":
                error = ApiError(event.text, status=500, kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                continue
            if event.finish_reason is not None:
                completion_tokens += event.completion_tokens
            yield chunk(index, event.text, event.finish_reason)
    finally:
        await events.aclose()  # cancels the generations if the client left
    if parsed.include_usage:
        usage = _usage(parsed.prompt_tokens, completion_tokens)
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def _run_dir(run: Run) -> Path | None:
    """The run directory a checkpoint belongs to (RUN/checkpoints/step-N), if any."""
    if run.checkpoint is None:
        return None
    ckpt = run.checkpoint.resolve()
    if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "metrics.jsonl").exists():
        return ckpt.parent.parent
    return None


# --------------------------------------------------------------------------- the app


def create_app(server: Server) -> Starlette:
    """The ASGI app: the API, the page, and OpenAI-shaped answers for anything else."""
    g = server.guard
    routes = [
        Route("/health", g(server.health, needs_key=False), methods=["GET"]),
        Route("/v1/models", g(server.models), methods=["GET"]),
        Route("/v1/completions", g(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", g(server.chat_completions), methods=["POST"]),
        Route("/v1/run", g(server.run_info), methods=["GET"]),
        *(Route(path, g(server.page, needs_key=False), methods=["GET"]) for path in PAGE_FILES),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return ApiError(exc.detail, status=exc.status_code, code=str(exc.status_code)).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError("internal error", status=500, kind="server_error").response()

    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error}
    )


class ServerThread:
    """The app served by uvicorn on a thread, on a socket bound before it starts (so the
    port is known, and connections wait in the listen queue until the server takes them).

    Used by the tests and the benchmark; `serve` runs uvicorn in the foreground instead.
    """

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.create_server((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def build(
    run: Run, max_batch: int = 16, precision: str = "fp32", api_key: str | None = None
) -> tuple[Starlette, Engine]:
    """The app over a loaded run, and its started engine (close it when done)."""
    engine = Engine(run.model, run.tokenizer, max_batch=max_batch, precision=precision).start()
    return create_app(Server(run, engine, api_key)), engine


def serve(
    run: Run,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    precision: str = "fp32",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `run` until interrupted (Ctrl-C); `on_ready(url)` once the socket listens."""
    app, engine = build(run, max_batch, precision, api_key)
    try:
        # a listening socket first, so `on_ready` is true when it is called
        sock = socket.create_server((host, port))
        if on_ready is not None:
            on_ready(f"http://{host}:{sock.getsockname()[1]}")
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
