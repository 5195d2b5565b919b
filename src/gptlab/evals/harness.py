"""lm-evaluation-harness's model `gptlab`: any lm-eval task on a gptlab run, checkpoint or
Hugging Face folder (what `gptlab generate --checkpoint` accepts).

    pip install 'gptlab[eval]'
    gptlab-lm-eval --model gptlab --model_args checkpoint=RUN --tasks hellaswag

`gptlab-lm-eval` is lm-eval's own command line with this module imported first: lm-eval
(0.4.13) resolves `--model` only among its built-in models and classes registered in the
running process, so plain `lm_eval --model gptlab` cannot work. From Python, import this
module to register the name, or pass `GptlabLM(checkpoint=RUN)` as the model.

Log-likelihoods are scored by `score_requests`, as `gptlab eval --task` scores them;
`generate_until` decodes through the `Engine`, as `gptlab generate` does. One process only
(lm-eval's data parallelism over accelerate is not wired).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.evals.tasks import score_requests
from gptlab.infer.engine import Engine, Sampling
from gptlab.interop.runs import open_run
from gptlab.runtime.device import PRECISION_DTYPES, autocast

# gptlab's precisions, and lm-eval's `dtype` names (Hugging Face's) for them
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_DTYPES |= {p: p for p in PRECISION_DTYPES}
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default


def _positive_int(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        raise GptlabError(f"{name} must be a whole number of at least 1, got {value!r}")
    return n


def _batch_size(value) -> int:
    # lm-eval passes its --batch_size as given (default 1); "auto" (lm-eval's search for the
    # largest batch that fits) is not done here: it means gptlab's default.
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    return _positive_int("batch_size", value)


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab model for lm-eval. model_args: `checkpoint` (a run, checkpoint or Hugging
    Face folder), `device` (auto, cpu, cuda[:N], mps; cuda means auto without a GPU),
    `batch_size` (requests per forward pass), `precision` (fp32, bf16, fp16) or lm-eval's
    `dtype`, `max_length` (at most the context length), `max_gen_toks` (generate_until's
    default). `max_batch_size` (for lm-eval's "auto" batch search) is unused.
    """

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        precision: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
        pretrained: str | None = None,
    ):
        super().__init__()
        checkpoint = checkpoint if checkpoint is not None else pretrained
        if not checkpoint:
            raise GptlabError(
                "the gptlab model needs a checkpoint: --model_args checkpoint=RUN_DIR "
                "(a gptlab run, checkpoint or Hugging Face folder)"
            )
        if precision is not None and dtype is not None:
            raise GptlabError("give precision or dtype, not both")
        name = str(precision or dtype or "fp32")
        if name == "auto":
            name = "fp32"
        if _DTYPES.get(name) not in PRECISION_DTYPES:
            raise GptlabError(
                f"precision {name!r} is not one of fp32, bf16, fp16 (or float32, bfloat16, float16)"
            )
        self.precision = _DTYPES[name]
        device = str(device or "auto")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device, default cuda:0, even where there is
            # no GPU; its Hugging Face model falls back, and so does this one
            device = "auto"
        self.run = open_run(str(checkpoint), device)
        self.model = self.run.model.eval()
        self.tokenizer = self.run.tokenizer
        self._device = self.run.device
        if self.precision == "fp16" and self._device.type == "cpu":
            raise GptlabError("fp16 is not supported on CPU; use precision=bf16 or fp32")
        context = self.run.config.model.context_length
        self._max_length = (
            context if max_length is None else _positive_int("max_length", max_length)
        )
        if self._max_length > context:
            raise GptlabError(
                f"max_length {self._max_length} exceeds the model's context of {context} tokens; "
                "give at most that"
            )
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        eot = getattr(self.tokenizer, "eot_token", None)
        if eot is None:
            raise GptlabError(
                "this model's tokenizer has no <|endoftext|> token, which lm-eval puts before "
                "an empty context and a rolling window; use a tokenizer trained with one"
            )
        return eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return json.dumps(self.tokenizer.identity(), sort_keys=True)[:200]

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # gptlab adds no special tokens; "<|endoftext|>" in text is the special token, as a
        # Hugging Face GPT-2 tokenizer reads it.
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list:
        with autocast(self._device, self.precision):
            return score_requests(
                self.model,
                pairs,
                context_length=self._max_length,
                batch_size=self.batch_size,
                device=self._device,
                eot_id=getattr(self.tokenizer, "eot_token", None),
            )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """TemplateLM's ((context, continuation), context ids, continuation ids) requests
        -> (sum of log-probabilities, greedy) each."""
        scores = self._score([(list(c), list(k)) for _, c, k in requests])
        out = []
        for (key, _, _), s in zip(requests, scores, strict=True):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: every token scored once, the first after
        <|endoftext|>, each window reading as much of what precedes it as fits."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for ctx, pred in map(lm_utils.make_disjoint_window, rolling):
                windows.append((list(ctx), list(pred)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows), strict=True):
            totals[i] += s.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation: (context, gen_kwargs) -> text, cut before the first
        stop string. A prompt keeps its last max_length - max_gen_toks tokens (as lm-eval's
        Hugging Face model); requests with the same gen_kwargs decode together."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode([self.eot_token_id])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptlab generate_until")
        for rows in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[rows[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks"))
            room = self._max_length - max_new
            if room < 1:
                raise GptlabError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                    f"{self._max_length} tokens; ask for fewer"
                )
            sampling = _sampling(kwargs, max_new, tuple(until))
            prompts = [
                self.tok_encode(requests[i].args[0])[-room:] or [self.eot_token_id] for i in rows
            ]
            texts: list[list[str]] = [[] for _ in rows]
            for j, event in self._engine(sampling).decode(prompts, sampling):
                texts[j].append(event.text)
                bar.update(event.finish_reason is not None)
            for i, parts in zip(rows, texts, strict=True):
                out[i] = "".join(parts)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        bar.close()
        return out  # type: ignore[return-value]

    def _engine(self, sampling: Sampling) -> Engine:
        # sampling draws from a generator seeded from torch's global one, which lm-eval
        # seeds: a run repeats (greedy decoding leaves the global one alone)
        seed = int(torch.randint(2**62, ())) if sampling.temperature > 0 else 0
        return Engine(self.model, self.tokenizer, self.batch_size, self.precision, seed=seed)


def _sampling(kwargs: dict, max_new: int, until: tuple[str, ...]) -> Sampling:
    """The engine's Sampling from lm-eval's normalised gen_kwargs: greedy unless do_sample
    with a temperature above 0."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k = kwargs.pop("top_k", None)
    top_p = kwargs.pop("top_p", None)
    if not do_sample or temperature <= 0.0:
        return Sampling(max_new, temperature=0.0, stop=until)
    return Sampling(
        max_new,
        temperature=temperature,
        top_k=int(top_k) if top_k is not None else None,
        top_p=float(top_p) if top_p is not None else None,
        stop=until,
    )
