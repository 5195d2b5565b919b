"""Chatting with a model: a conversation rendered into the prompt for the next reply, and
`Conversation`, which keeps the history and streams each reply through the engine.

A run finetuned for chat or on instructions has a chat template (`gptlab.data.chat`): the
conversation is rendered by it and the reply ends at its end id. A base model has none; it
gets the plays-style template, which suits a model trained on plays: each message is a
speech, its speaker's name in capitals on a line of its own (`USER:`, `ASSISTANT:`),
speeches apart by a blank line, system messages as plain paragraphs; the prompt ends with
`ASSISTANT:` and a newline, and the reply ends at the first blank line (where the next
speaker would begin):

    {system}\\n\\nUSER:\\n{user}\\n\\nASSISTANT:\\n{assistant}\\n\\nUSER:\\n...\\n\\nASSISTANT:\\n
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from gptlab.data.chat import Template, check_messages, render
from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer
from gptlab.errors import GptlabError
from gptlab.infer.engine import Engine, Sampling

PLAYS_STOP = "\n\n"  # a speech ends at a blank line, before the next speaker's name
PLAYS_SPEAKERS = {"user": "USER", "assistant": "ASSISTANT"}


def render_plays(messages: Sequence[dict[str, str]], where: str = "messages") -> str:
    """The prompt text of the plays-style template (the module docstring) for `messages`,
    contents stripped. Raises GptlabError for bad messages, naming `where`."""
    parts = []
    for m in check_messages(messages, where):
        content = m["content"].strip()
        role = m["role"]
        parts.append(content if role == "system" else f"{PLAYS_SPEAKERS[role]}:\n{content}")
    parts.append("ASSISTANT:\n")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class ChatPrompt:
    """A prompt for the next reply: its ids, and what ends the reply (stop strings, ids)."""

    ids: list[int]
    stop: tuple[str, ...]
    stop_ids: tuple[int, ...]


def chat_prompt(
    template: Template | None,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, str]],
    where: str = "messages",
) -> ChatPrompt:
    """`messages` as a prompt for the assistant's next reply: with a run's template (a chat
    or instructions finetune), rendered by it and ended by its end id; with None (a base
    model), `render_plays` and its blank-line stop. Raises GptlabError for bad messages."""
    if template is None:
        text = render_plays(messages, where)
        return ChatPrompt(tokenizer.encode(text, allowed_special={ENDOFTEXT}), (PLAYS_STOP,), ())
    ids, _ = render(template, tokenizer, messages, add_generation_prompt=True, where=where)
    return ChatPrompt(ids, (), (template.end_id(tokenizer),))


class Conversation:
    """A chat, one reply at a time: `reply(text)` adds the user's message, renders the
    whole history (after the system message, if any) through `template` (None: the plays
    template), and streams the assistant's reply from `engine` (not started: it decodes in
    the calling thread). `sampling` sets how replies are sampled and their most tokens
    (default: as many as the context holds); its stop strings and ids add to the
    template's. When the history outgrows the context window, the oldest exchanges are
    dropped."""

    def __init__(
        self,
        engine: Engine,
        template: Template | None,
        system: str | None = None,
        sampling: Sampling | None = None,
    ):
        self.engine = engine
        self.template = template
        self.system = [{"role": "system", "content": system}] if system else []
        self.sampling = sampling or Sampling(max_tokens=engine.context_length)
        self.history: list[dict[str, str]] = []  # the user's and the assistant's messages

    def reply(self, text: str) -> Iterator[str]:
        """The assistant's reply to `text`, piece by piece as it is sampled; the exchange
        joins the history once the reply is whole. A GptlabError if even the newest message
        alone does not fit the context window."""
        context = self.engine.context_length
        history = [*self.history, {"role": "user", "content": text}]
        prompt = chat_prompt(self.template, self.engine.tokenizer, self.system + history)
        while len(prompt.ids) > context and len(history) > 1:
            history = history[2:]  # the oldest user message and its reply
            prompt = chat_prompt(self.template, self.engine.tokenizer, self.system + history)
        if len(prompt.ids) > context:
            raise GptlabError(
                f"the chat prompt is {len(prompt.ids)} tokens, longer than the context window "
                f"of {context}; shorten the message or the system message"
            )
        room = context - len(prompt.ids) + 1  # the last token sampled is never fed back
        s = self.sampling
        sampling = replace(
            s,
            max_tokens=min(s.max_tokens, room),
            stop=(*prompt.stop, *s.stop),
            stop_ids=(*prompt.stop_ids, *s.stop_ids),
        )
        pieces = []
        for piece in self.engine.stream(prompt.ids, sampling):
            pieces.append(piece)
            yield piece
        self.history = [*history, {"role": "assistant", "content": "".join(pieces)}]
