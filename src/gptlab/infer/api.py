"""The requests `gptlab serve` takes, in OpenAI's shapes: every field checked (types, ranges,
prompt length, body size, JSON), prompts encoded, and turned into jobs for the engine; no
field names a file. Fields asking what the server does not do are refused, not ignored;
refusals are `ApiError`s, answered in OpenAI's error shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer, eot_id
from gptlab.infer.engine import Sampling

MAX_BODY = 1 << 20  # bytes: far above any prompt a context window holds
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, all prompts together
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 256


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
        self.message, self.status, self.param = message, status, param
        self.code, self.kind = code, kind

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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


def stop_strings(body: dict) -> tuple[str, ...]:
    """The request's `stop`: a string or a list of them (empty ones dropped)."""
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
    """Refuse fields that would change the answer in ways this server does not do
    (their defaults, like echo=false, pass)."""
    for name, neutral in (("echo", False), ("logprobs", False), ("suffix", ""), ("tools", [])):
        if body.get(name) not in (None, neutral):
            raise ApiError(f"{name} is not supported by gptlab serve", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(f"{name} is not supported by gptlab serve; leave it 0", param=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def json_body(request: Request) -> dict:
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


def encode_prompts(
    prompt: Any, tokenizer: Tokenizer, vocab_limit: int, context: int
) -> list[list[int]]:
    """A completion's prompt (text, texts, ids, or lists of ids) -> token ids per prompt."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ApiError("prompt must be a string, a list of strings or token ids", param="prompt")
    if len(prompts) > MAX_CHOICES:
        raise ApiError(f"at most {MAX_CHOICES} prompts per request", param="prompt")
    return [prompt_ids(p, tokenizer, vocab_limit, context) for p in prompts]


def prompt_ids(prompt: Any, tokenizer: Tokenizer, vocab_limit: int, context: int) -> list[int]:
    """One prompt (text, or ids below `vocab_limit`) as ids that fit the `context` window."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allowed_special={ENDOFTEXT})
        if not ids:  # an empty prompt starts a new document, as GPT-2 was trained to
            eos = eot_id(tokenizer)
            if eos is None:
                raise ApiError("prompt is empty; give some text to continue", param="prompt")
            ids = [eos]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < vocab_limit for t in prompt):
            raise ApiError(f"token ids must be from 0 to {vocab_limit - 1}", param="prompt")
        ids = list(prompt)
    else:
        raise ApiError("each prompt must be a string or a list of token ids", param="prompt")
    if len(ids) > context:
        raise ApiError(
            f"the prompt is {len(ids)} tokens, longer than the model's context window of "
            f"{context}; shorten it",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as the templates take them: content parts joined, unstripped (as the
    template saw training text); OpenAI's "developer" role is "system"."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object with role and content", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(
        f"messages[{i}].content must be a string or a list of text parts", param="messages"
    )


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


def parse(
    body: dict,
    prompts: list[list[int]],
    stop: tuple[str, ...],
    default_max: int,
    context: int,
    stop_ids: tuple[int, ...] = (),
) -> Parsed:
    """The sampling fields common to completions and chat -> n jobs per prompt, choice i
    seeded with seed + i, max_tokens capped to what `context` holds."""
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
        raise ApiError(f"at most {MAX_CHOICES} choices (prompts times n) per request", param="n")
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
        room = context - len(ids) + 1  # the last token sampled is never fed back
        for i in range(n):
            index = p * n + i
            choice_seed = None if seed is None else seed + index
            sampling = replace(base, max_tokens=min(max_tokens, room), seed=choice_seed)
            jobs.append(Job(index, p, ids, sampling))
    return Parsed(jobs, sum(len(ids) for ids in prompts), stream, include_usage)


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
