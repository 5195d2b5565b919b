"""Chatting with a model: a conversation rendered into the prompt for the next reply, and
`Conversation`, which keeps the history and streams each reply through the engine.

A run finetuned for chat or instructions has a chat template (`gptlab.data.chat`) and the
reply ends at its end id. A base model gets the plays-style template (suits a model trained
on plays): each speech under its speaker's name in capitals, system messages as plain
paragraphs, the reply ending at the first blank line (where the next speaker would begin):

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
    """The plays-style prompt text for `messages`, contents stripped; a GptlabError naming
    `where` for bad messages."""
    parts = []
    for m in check_messages(messages, where):
        content, role = m["content"].strip(), m["role"]
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
    """`messages` as a prompt for the assistant's next reply: rendered by `template` and
    ended by its end id, or (None) by `render_plays` and its blank-line stop."""
    if template is None:
        text = render_plays(messages, where)
        return ChatPrompt(tokenizer.encode(text, allowed_special={ENDOFTEXT}), (PLAYS_STOP,), ())
    ids, _ = render(template, tokenizer, messages, add_generation_prompt=True, where=where)
    return ChatPrompt(ids, (), (template.end_id(tokenizer),))


class Conversation:
    """A chat, one reply at a time, streamed from a not-started `engine`. `template` None is
    the plays template; `sampling` (default: up to a full context) adds its stop strings
    and ids to the template's. The oldest exchanges go when the context overflows."""

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
        self.history: list[dict[str, str]] = []  # user and assistant messages

    def reply(self, text: str) -> Iterator[str]:
        """The reply to `text`, piece by piece; the exchange joins the history once whole.
        A GptlabError if the newest message alone does not fit the context window."""
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
        stop, stop_ids = (*prompt.stop, *s.stop), (*prompt.stop_ids, *s.stop_ids)
        sampling = replace(s, max_tokens=min(s.max_tokens, room), stop=stop, stop_ids=stop_ids)
        pieces = []
        for piece in self.engine.stream(prompt.ids, sampling):
            pieces.append(piece)
            yield piece
        self.history = [*history, {"role": "assistant", "content": "".join(pieces)}]
