"""`gptlab serve`: a trained model behind an OpenAI-compatible HTTP API (the `openai`
client and curl work unchanged), with a page.

- `GET /v1/models`: the one model served.
- `POST /v1/completions`: prompt (text, texts or token ids), max_tokens, temperature, top_p,
  top_k (an extension), stop, seed, n, stream (server-sent events ending `data: [DONE]`).
- `POST /v1/chat/completions`: messages rendered as `gptlab generate --chat` does; streams too.
- `GET /v1/run`: the run's config, chat template (null for a base model) and metrics
  records, for the page's views.
- `GET /health`: liveness and load, the one endpoint that needs no key.
- `GET /`: the page (chat, playground, run view), shipped in gptlab/infer/static, offline.

Binds 127.0.0.1 unless told otherwise; with an API key, every endpoint but `/health` and the
page needs `Authorization: Bearer KEY`. The engine runs on its own thread; events reach the
event loop through an asyncio queue, and a client that leaves cancels its generations.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from functools import partial
from importlib import resources
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gptlab.errors import GptlabError
from gptlab.infer.api import (
    ApiError,
    Job,
    Parsed,
    chat_messages,
    encode_prompts,
    json_body,
    parse,
    prompt_ids,
    stop_strings,
    usage_counts,
)
from gptlab.infer.chat import chat_prompt
from gptlab.infer.engine import Engine, Event
from gptlab.interop.runs import Run
from gptlab.observe.metrics import read_metrics

RUN_EVENTS = {"start", "train", "eval", "tasks", "sample", "checkpoint", "end"}  # for the run view
PAGE_FILES = {  # the page's files: a fixed list, no request names a path
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


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

    async def completions(self, request: Request) -> Response:
        body = await json_body(request)
        if "prompt" not in body:
            raise ApiError("prompt is required", param="prompt")
        limit = self.engine.vocab_limit
        prompts = encode_prompts(body["prompt"], self.tokenizer, limit, self.context)
        parsed = parse(body, prompts, stop_strings(body), 16, self.context)
        return await self._respond(parsed, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await json_body(request)
        messages = chat_messages(body.get("messages"))
        try:
            prompt = chat_prompt(self.run.chat_template, self.tokenizer, messages)
        except GptlabError as e:
            raise ApiError(str(e), param="messages") from None
        ids = prompt_ids(prompt.ids, self.tokenizer, self.engine.vocab_limit, self.context)
        stop = (*prompt.stop, *stop_strings(body))
        parsed = parse(body, [ids], stop, self.context, self.context, prompt.stop_ids)
        return await self._respond(parsed, chat=True)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "gptlab",
            "context_length": self.context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, **self.engine.load()})

    async def run_info(self, request: Request) -> Response:
        """The run's config, chat template (the page offers chat where it is not null) and
        metrics records."""
        records: list[dict] = []
        metrics = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if metrics is not None and metrics.is_file():
            records = await asyncio.to_thread(read_metrics, metrics)
            records = [r for r in records if r.get("event") in RUN_EVENTS]
        last = next((r["event"] for r in reversed(records) if r["event"] in ("start", "end")), None)
        template = self.run.chat_template
        info = {
            "model": self.model_name,
            "checkpoint": self.run.checkpoint.name if self.run.checkpoint else None,
            "config": self.run.config.to_dict(),
            "chat_template": template.to_dict() if template is not None else None,
            "training": last == "start",
            "records": records,
        }
        return JSONResponse(info)

    async def page(self, request: Request) -> Response:
        name, media = PAGE_FILES[request.url.path]
        text = resources.files("gptlab.infer").joinpath("static", name).read_text(encoding="utf-8")
        return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})

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
            reply = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            end = {"finish_reason": finish[index], "logprobs": None}
            choices.append({"index": index, **reply, **end})
        usage = usage_counts(parsed.prompt_tokens, sum(tokens.values()))
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


async def _run_jobs(engine: Engine, jobs: list[Job]) -> AsyncIterator[tuple[int, Event]]:
    """Submit the jobs and yield (choice index, event) as they come, until all finish.
    Leaving early (the client went away: the task is cancelled) cancels what still runs."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def on_event(index: int, event: Event) -> None:  # on the engine's thread
        with suppress(RuntimeError):  # the event loop has closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    gens = [engine.submit(job.ids, job.sampling, partial(on_event, job.index)) for job in jobs]
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
        usage = usage_counts(parsed.prompt_tokens, completion_tokens)
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
    """The app served by uvicorn on a thread (for tests and benchmarks), on a socket bound
    first: the port is known, and connections wait in the listen queue until served."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.create_server((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
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
    run: Run,
    max_batch: int = 16,
    precision: str = "fp32",
    api_key: str | None = None,
    compile: bool = False,
) -> tuple[Starlette, Engine]:
    """The app over a loaded run, and its started engine (close it when done); a GptlabError
    for a classifier, which writes no text."""
    engine = Engine.for_run(
        run, "serve", max_batch=max_batch, precision=precision, compile=compile
    ).start()
    return create_app(Server(run, engine, api_key)), engine


def serve(
    run: Run,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    precision: str = "fp32",
    on_ready: Callable[[str], None] | None = None,
    compile: bool = False,
) -> None:
    """Serve `run` until interrupted (Ctrl-C); `on_ready(url)` once the socket listens."""
    app, engine = build(run, max_batch, precision, api_key, compile)
    try:
        # a listening socket first, so `on_ready` is true when it is called
        sock = socket.create_server((host, port))
        if on_ready is not None:
            on_ready(f"http://{host}:{sock.getsockname()[1]}")
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
    finally:
        engine.close()
