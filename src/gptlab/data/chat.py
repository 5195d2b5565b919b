"""Chat templates: conversations (`messages: [{role, content}, ...]`, the OpenAI and Hugging
Face shape) to token ids, with a special token for each turn.

A conversation renders as (here with the default template, `bos` on)

    <|endoftext|><|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

and a prompt for the model's next reply ends with `<|assistant|>` (`add_generation_prompt`);
the reply ends when the model samples `<|end|>`. Content is encoded with `encode_ordinary`,
so a user who types "<|user|>" gets the ids of that text, not the marker's.

A base model's tokenizer lacks these tokens: `ensure_special_tokens` grows it and the model.
The template travels with the run (chat_template.json, or a checkpoint's meta.json key
`chat_template`); `jinja` writes it for `transformers`' `apply_chat_template`, which gives
the same ids (`gptlab convert to-hf` puts it in the exported folder).

An instructions run learned the book's Alpaca prompt instead: `InstructionTemplate` (`ALPACA`)
has no special tokens and grows nothing, and is saved and used the same way. Both kinds answer
`render`, `end_id`, `jinja` and `to_dict`; the saved `kind` says which (none: special-tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from gptlab.atomic import write_json
from gptlab.data.tokenizer import ENDOFTEXT, Tokenizer, WithSpecialTokens, eot_id
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPTModel
from gptlab.model.vocab import check_vocab_rows, grow_vocab

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.json"  # in a run directory, beside checkpoints/
META_KEY = "chat_template"  # in a checkpoint's meta.json
FORMAT = "gptlab-chat-template"


class _Fields:
    """What both kinds of template share: their fields saved with their `kind`, and read back."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The fields and the kind, as `template_from_dict` reads them back."""
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "chat template") -> Any:
        """The template `to_dict` wrote (a ChatTemplate's may lack `kind`); a GptlabError
        naming `where` for another kind, unknown keys or values of the wrong type."""
        types = {f.name: f.type for f in fields(cls)}  # names of types: annotations are strings
        names = {"kind", *types}
        if isinstance(d, dict) and d.get("kind", cls.kind) != cls.kind:
            raise GptlabError(f"{where} is of kind {d['kind']!r}, not {cls.kind!r}")
        if not isinstance(d, dict) or set(d) - names:
            extra = sorted(set(d) - names) if isinstance(d, dict) else type(d).__name__
            raise GptlabError(
                f"{where} is malformed (unexpected {extra}); it takes {sorted(names)}"
            )
        values = {k: v for k, v in d.items() if k != "kind"}
        flags = [k for k, t in types.items() if t == "bool"]
        if not all(isinstance(v, bool if k in flags else str) for k, v in values.items()):
            rule = "its fields are strings"
            if flags:
                rule = f"{', '.join(flags)} true/false, the rest strings"
            raise GptlabError(f"{where} is malformed: {rule}")
        return cls(**values)


@dataclass(frozen=True)
class ChatTemplate(_Fields):
    """One special token opens each role's turn, one ends every turn; with `bos`, the
    tokenizer's `<|endoftext|>` (which every pretraining document followed) comes first."""

    kind: ClassVar[str] = "special-tokens"  # in the saved template, beside the fields
    name: str = "gptlab-chat"
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    bos: bool = True

    def __post_init__(self):
        tokens = self.special_tokens
        if not all(isinstance(t, str) and t.strip() == t and t for t in tokens):
            raise GptlabError(
                f"chat template {self.name!r}: its special tokens must be non-empty strings "
                f"without surrounding spaces, got {list(tokens)!r}"
            )
        if len(set(tokens)) != len(tokens) or ENDOFTEXT in tokens:
            raise GptlabError(
                f"chat template {self.name!r}: its special tokens must differ from each other "
                f"and from {ENDOFTEXT}, got {list(tokens)!r}"
            )
        if not isinstance(self.bos, bool):
            raise GptlabError(f"chat template {self.name!r}: bos must be true or false")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The template's tokens, in the order a tokenizer grows by them."""
        return (self.system, self.user, self.assistant, self.end)

    @property
    def bos_token(self) -> str | None:
        """The token every rendering starts with, or None."""
        return ENDOFTEXT if self.bos else None

    @property
    def openers(self) -> dict[str, str]:
        """The token that opens each role's turn."""
        return {"system": self.system, "user": self.user, "assistant": self.assistant}

    def render(
        self,
        tokenizer: Tokenizer,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = False,
        where: str = "messages",
    ) -> tuple[list[int], list[bool]]:
        """(ids, mask): the conversation's token ids, and True where the model learns to
        produce the id (each assistant message's content and its `end`). With
        `add_generation_prompt` the ids end with the assistant's opener. `where` names the
        messages in errors; bad messages and a tokenizer lacking the template's tokens are
        GptlabErrors."""
        messages = check_messages(messages, where)
        ids_of = self._ids_of(
            tokenizer, "; grow it first (chat.ensure_special_tokens, which gptlab finetune does)"
        )
        ids: list[int] = []
        mask: list[bool] = []
        if self.bos:
            bos = eot_id(tokenizer)
            if bos is None:
                raise GptlabError(
                    f"chat template {self.name!r} starts with {ENDOFTEXT}, which this "
                    "tokenizer lacks; use a template with bos off"
                )
            ids.append(bos)
            mask.append(False)
        for m in messages:
            learn = m["role"] == "assistant"
            content = tokenizer.encode_ordinary(m["content"])
            ids.append(ids_of[self.openers[m["role"]]])
            ids.extend(content)
            ids.append(ids_of[self.end])
            mask.extend([False] + [learn] * (len(content) + 1))
        if add_generation_prompt:
            ids.append(ids_of[self.assistant])
            mask.append(False)
        return ids, mask

    def end_id(self, tokenizer: Tokenizer) -> int:
        """The id of `end`, which closes every turn: a reply ends when it is sampled."""
        return self._ids_of(tokenizer)[self.end]

    def _ids_of(self, tokenizer: Tokenizer, fix: str = "") -> dict[str, int]:
        """The template's tokens' ids; a GptlabError (ending in `fix`) if any is missing."""
        missing = missing_tokens(tokenizer, self)
        if missing:
            raise GptlabError(
                f"the tokenizer lacks the chat template's special tokens {', '.join(missing)}{fix}"
            )
        return {t: tokenizer.special_id(t) for t in self.special_tokens}

    def jinja(self) -> str:
        """The template as a Jinja string for `apply_chat_template`: the same ids as `render`,
        with `{% generation %}` around what `render`'s mask marks."""
        q = json.dumps  # a JSON string is a valid Jinja string literal
        bad = "messages must have role system, user or assistant"
        return (
            "{%- set opener = "
            + json.dumps(self.openers)
            + " -%}"
            + ("{{- bos_token -}}" if self.bos else "")
            + "{%- for message in messages -%}"
            "{%- if message['role'] not in opener -%}"
            "{{- raise_exception(" + q(bad) + ") -}}"
            "{%- endif -%}"
            "{{- opener[message['role']] -}}"
            "{%- if message['role'] == 'assistant' -%}"
            "{%- generation -%}{{- message['content'] + "
            + q(self.end)
            + " -}}{%- endgeneration -%}"
            "{%- else -%}"
            "{{- message['content'] + " + q(self.end) + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + q(self.assistant) + " -}}{%- endif -%}"
        )


DEFAULT = ChatTemplate()

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class InstructionTemplate(_Fields):
    """The book's Alpaca prompt (chapter 7) as a chat template, for a model finetuned on
    instructions records. A conversation of one user message renders as

        Below is an instruction that describes a task. Write a response that appropriately
        completes the request.

        ### Instruction:
        What is the capital of Zembla?

        ### Response:

    and the reply ends at `<|endoftext|>`. Each exchange (a user message, the instruction,
    and the assistant's response) renders whole as one training example, after the earlier
    ones, so the newest is prompted exactly as in training. A first system message replaces
    the preamble; then user and assistant messages alternate, and a generation prompt ends
    with a user message; anything else is a one-line GptlabError.
    """

    kind: ClassVar[str] = "instruction"
    name: str = "alpaca"
    preamble: str = ALPACA_PREAMBLE
    instruction_header: str = "### Instruction:"
    input_header: str = "### Input:"
    response_header: str = "### Response:"

    def __post_init__(self):
        headers = (self.instruction_header, self.input_header, self.response_header)
        if not all(isinstance(h, str) and h.strip() for h in headers):
            raise GptlabError(
                f"instruction template {self.name!r}: its headers must be non-empty strings, "
                f"got {list(headers)!r}"
            )
        if not isinstance(self.preamble, str):
            raise GptlabError(f"instruction template {self.name!r}: the preamble must be text")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """None: the prompt is plain text, and its end is the tokenizer's `<|endoftext|>`."""
        return ()

    @property
    def bos_token(self) -> str | None:
        """None: an example starts with its preamble, as the finetune renders it."""
        return None

    @property
    def response_prompt(self) -> str:
        """What comes between an instruction and its response: "\\n\\n### Response:\\n"."""
        return f"\n\n{self.response_header}\n"

    def format_input(
        self, instruction: str, input_text: str = "", preamble: str | None = None
    ) -> str:
        """The book's `format_input`: the prompt of one instruction (and input) without the
        response header, with `preamble` in place of the template's own when given."""
        head = self.preamble if preamble is None else preamble
        text = f"{head}\n\n{self.instruction_header}\n{instruction}"
        if input_text:
            text += f"\n\n{self.input_header}\n{input_text}"
        return text

    def exchanges(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = False,
        where: str = "messages",
    ) -> tuple[str, list[tuple[str, str | None]]]:
        """A conversation checked against the rules above: (the preamble, [(instruction,
        response or None for the last unanswered one), ...])."""
        messages = check_messages(messages, where)
        preamble, first = self.preamble, 0
        if messages[0]["role"] == "system":
            preamble, first = messages[0]["content"], 1
        pairs: list[tuple[str, str | None]] = []
        for i in range(first, len(messages)):
            role, content = messages[i]["role"], messages[i]["content"]
            want = "user" if (i - first) % 2 == 0 else "assistant"
            if role != want:
                raise GptlabError(
                    f"{where}[{i}] has role {role!r}, but {want!r} comes next: an instruction "
                    "run's chat is an optional system message (in place of the preamble), then "
                    "user and assistant messages in turn"
                )
            if role == "user":
                pairs.append((content, None))
            else:
                pairs[-1] = (pairs[-1][0], content)
        if add_generation_prompt and (not pairs or pairs[-1][1] is not None):
            raise GptlabError(
                f"{where} end with the {messages[-1]['role']}'s message; end them with the "
                "user's instruction for the model to answer"
            )
        return preamble, pairs

    def render(
        self,
        tokenizer: Tokenizer,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = False,
        where: str = "messages",
    ) -> tuple[list[int], list[bool]]:
        """(ids, mask): the conversation's token ids, and True on each response and its
        `<|endoftext|>`. Each exchange's prompt (with the response header when a response or
        the generation prompt follows) is encoded as one plain text and each response on its
        own, as the finetune encodes them; messages that break the rules are GptlabErrors."""
        preamble, pairs = self.exchanges(messages, add_generation_prompt, where)
        end = self.end_id(tokenizer)
        ids: list[int] = []
        mask: list[bool] = []
        for n, (instruction, response) in enumerate(pairs):
            text = self.format_input(instruction, preamble=preamble)
            if response is not None or (add_generation_prompt and n == len(pairs) - 1):
                text += self.response_prompt
            prompt = tokenizer.encode_ordinary(text)
            ids.extend(prompt)
            mask.extend([False] * len(prompt))
            if response is not None:
                reply = [*tokenizer.encode_ordinary(response), end]
                ids.extend(reply)
                mask.extend([True] * len(reply))
        return ids, mask

    def end_id(self, tokenizer: Tokenizer) -> int:
        """The id of `<|endoftext|>`, which the finetune put after every output."""
        end = eot_id(tokenizer)
        if end is None:
            raise GptlabError(
                f"the tokenizer has no {ENDOFTEXT}, which ends an instruction run's "
                "responses; use the run's own tokenizer"
            )
        return end

    def jinja(self) -> str:
        """The template as a Jinja string for `apply_chat_template`: the same text and
        refusals as `render` (`{% generation %}` around what its mask marks)."""
        q = json.dumps  # a JSON string is a valid Jinja string literal
        turns = (
            "an instruction run's chat is an optional system message (in place of the "
            "preamble), then user and assistant messages in turn"
        )
        last = "end the messages with the user's instruction for the model to answer"
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set preamble = messages[0]['content'] -%}"
            "{%- set turns = messages[1:] -%}"
            "{%- else -%}"
            "{%- set preamble = " + q(self.preamble) + " -%}"
            "{%- set turns = messages -%}"
            "{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if loop.index0 is even and message['role'] == 'user' -%}"
            "{{- preamble + " + q(f"\n\n{self.instruction_header}\n") + " + message['content'] -}}"
            "{%- if not loop.last or add_generation_prompt -%}"
            "{{- " + q(self.response_prompt) + " -}}"
            "{%- endif -%}"
            "{%- elif loop.index0 is odd and message['role'] == 'assistant' -%}"
            "{%- generation -%}{{- message['content'] + "
            + q(ENDOFTEXT)
            + " -}}{%- endgeneration -%}"
            "{%- else -%}"
            "{{- raise_exception(" + q(turns) + ") -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt and (not turns or turns[-1]['role'] != 'user') -%}"
            "{{- raise_exception(" + q(last) + ") -}}"
            "{%- endif -%}"
        )


ALPACA = InstructionTemplate()

Template = ChatTemplate | InstructionTemplate  # what a run's chat_template is
KINDS: dict[str, type[Template]] = {t.kind: t for t in (ChatTemplate, InstructionTemplate)}


def template_from_dict(d: Any, where: str = "chat template") -> Template:
    """The template a `to_dict()` describes, of the class its `kind` names (none: a
    ChatTemplate); a GptlabError naming `where` for an unknown kind or malformed fields."""
    kind = d.get("kind", ChatTemplate.kind) if isinstance(d, dict) else ChatTemplate.kind
    if not isinstance(kind, str) or kind not in KINDS:
        raise GptlabError(
            f"{where} has kind {kind!r}, which this gptlab does not know "
            f"({', '.join(KINDS)}); upgrade gptlab or restore the run's template"
        )
    return KINDS[kind].from_dict(d, where)


def missing_tokens(tokenizer: Tokenizer, template: Template) -> list[str]:
    """The template's special tokens `tokenizer` has no id for."""
    lookup = getattr(tokenizer, "special_id", lambda t: None)
    return [t for t in template.special_tokens if lookup(t) is None]


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """`messages` checked: a non-empty list of {role: system|user|assistant, content: str}
    (other keys are ignored). A problem is a GptlabError naming `where` and the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GptlabError(f"{where} must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GptlabError(f"{where}[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise GptlabError(f"{where}[{i}] has role {role!r}; use system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise GptlabError(
                f"{where}[{i}] ({role}) needs its content as a string, "
                f"got {type(m.get('content')).__name__}"
            )
    return list(messages)


def render(
    template: Template,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
    where: str = "messages",
) -> tuple[list[int], list[bool]]:
    """`template.render`: (the conversation's token ids, the mask of those learned)."""
    return template.render(tokenizer, messages, add_generation_prompt, where)


def ensure_special_tokens(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    grow: bool = True,
    fix: str = "allow growing the vocabulary",
) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) that hold the template's special tokens. Missing ones are added,
    with `grow`, to the tokenizer (a `WithSpecialTokens`) and as rows of the model's embedding
    and output head initialised to the mean row (`model.cfg.vocab_size` grows in place);
    without it they are a GptlabError naming `fix`. Call it before wrapping the model."""
    missing = missing_tokens(tokenizer, template)
    if not missing:
        check_vocab_rows(model, tokenizer.n_vocab)
        return model, tokenizer
    if not grow:
        raise GptlabError(
            f"the base's tokenizer lacks the chat template's special tokens "
            f"{', '.join(missing)}; {fix}, or start from a base whose tokenizer has them"
        )
    if not isinstance(model, GPTModel):
        raise GptlabError(
            f"cannot add the chat template's special tokens to a {type(model).__name__} "
            "(only a bare GPTModel grows); add them before compiling or wrapping the model"
        )
    check_vocab_rows(model, tokenizer.n_vocab)
    if isinstance(tokenizer, WithSpecialTokens):  # grown before: keep its ids, add the rest
        grown = WithSpecialTokens(tokenizer.base, [*tokenizer.added, *missing])
    else:
        grown = WithSpecialTokens(tokenizer, missing)
    grow_vocab(model, old=tokenizer.n_vocab, new=grown.n_vocab)
    return model, grown


def save_template(run_dir: str | Path, template: Template) -> Path:
    """Write `template` atomically as RUN_DIR/chat_template.json, tokenizer_config-style:
    the Jinja string beside the fields gptlab reads back. Returns the file's path."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {
        "format": FORMAT,
        "template": template.to_dict(),
        "special_tokens": list(template.special_tokens),
        "bos_token": template.bos_token,
        "chat_template": template.jinja(),
    }
    path = out / TEMPLATE_FILE
    try:
        write_json(path, body, indent=1)
    except OSError as e:
        raise GptlabError(f"could not write {str(path)!r} ({e.strerror or e})") from None
    return path


def load_template(path: str | Path) -> Template | None:
    """The chat template of a run or checkpoint directory, or None (a base model): a
    checkpoint's meta.json key first, then chat_template.json here or in the run above. An
    instructions finetune that saved none (an older one) gets ALPACA, which it learned."""
    p = Path(path)
    meta = p / "meta.json"
    body: Any = {}
    if meta.is_file():
        try:
            body = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            pass  # an unreadable meta.json is the checkpoint loader's to report
    body = body if isinstance(body, dict) else {}
    if body.get(META_KEY) is not None:
        return template_from_dict(body[META_KEY], f"the chat_template in {str(meta)!r}")
    for place in [p, p.parent.parent] if p.parent.name == "checkpoints" else [p]:
        if (place / TEMPLATE_FILE).is_file():
            return _read_template_file(place / TEMPLATE_FILE)
    config = body.get("config")
    finetune = config.get("finetune") if isinstance(config, dict) else None
    if isinstance(finetune, dict) and finetune.get("format") == "instructions":
        return ALPACA
    return None


def _read_template_file(f: Path) -> Template:
    try:
        body = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise GptlabError(
            f"chat template {str(f)!r} is unreadable ({e}); restore it or remove it"
        ) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise GptlabError(
            f"{str(f)!r} is not a gptlab chat template (no format {FORMAT!r}); remove it"
        )
    return template_from_dict(body.get("template"), f"chat template {str(f)!r}")
