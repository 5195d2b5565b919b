"""A default that reads the corpus (`train.sizing = corpus`, the `cpu` preset's): model
shape, tokenizer, context, dropout and passes from the training text's size and the budget.

The tokenizer's size must be chosen before the text is tokenized, so every decision is made
from the training text's *bytes* (train_ratio of the bytes on disk, or of the built-in
plays), with tokens estimated as bytes / bytes-per-token.

The anchor is the one shape measured (BENCHMARKS.md, "Time to quality"): the plays, 4.49 MB
of training text, ~1.45M tokens at bpe:4096 (3.1 bytes a token), a 530 s budget, 4 layers x
256 (3.15M block parameters), context 128, no dropout: 1.995 bits per byte. Deeper and wider
models lost there (8 x 256 at equal time, 6 x 256 and 6 x 384 at equal steps), and the model
overfit in its second pass (train 3.57, val 4.22). The other rows follow two ceilings on the
block parameters N (12 x layers x width^2), each the anchor's at the anchor:

- compute: N <= N_anchor x sqrt(budget x speed / (530 s x 4,800 tokens/s)), speed being this
  machine's tokens/s on the anchor shape (Chinchilla: the best N grows as the square root of
  compute; the ratio is the one measured here, not Chinchilla's 20 tokens a parameter);
- data: N <= N_anchor x (training tokens / 1.45M): no fewer unique tokens per parameter than
  the plays, where the model already began to memorise them.

The largest rung within 1.25 x the lower ceiling is chosen:

| rung | layers x width | heads | context | block params |
| --- | --- | ---: | ---: | ---: |
| 0 | 2 x 128 | 2 | 64 | 0.39M |
| 1 | 3 x 192 | 3 | 128 | 1.33M |
| 2 | **4 x 256** (measured) | 4 | 128 | 3.15M |
| 3 | 6 x 384 | 6 | 256 | 10.6M |
| 4 | 8 x 512 | 8 | 256 | 25.2M |

Tokenizer by training bytes (a small text cannot fill a large vocabulary with merges that
recur): under 1 MB bpe:1024, under 2.5 MB bpe:2048, under 16 MB **bpe:4096** (measured),
above bpe:8192.

Passes E = budget x estimated tokens/s / training tokens, the speed measured on the machine
that will train (no constant fits every CPU: gptlab.train.resolve's `measure_speed`, ~2 s of
steps of the anchor shape; `train.sizing_speed` keeps or gives it), scaled by FLOPs per
token for the other rungs (at most 2x for the overhead-bound smaller ones). Dropout by E,
after Muennighoff et al. 2023 (up to ~4 passes, repeated text is worth nearly fresh text;
past ~16, almost nothing more): E <= 4: **0** (the plays: ~1.8); 4 < E <= 16: 0.1; above:
0.2. Above 16 passes the budget is cut to the time of 16: more would only memorise.

So, at the 530 s budget and 4,800 tokens/s (training bytes; `tests/test_sizing.py` checks
these rows; a slower machine moves the boundaries down):

| training text | shape | tokenizer | context | dropout | passes |
| --- | --- | --- | ---: | ---: | --- |
| under 0.76 MB | 2 x 128 | bpe:1024 | 64 | 0.2 | 16: the budget is cut |
| 0.76-1.0 MB | 2 x 128 | bpe:1024 | 64 | 0.1 | 14-16 |
| 1.0-1.38 MB | 2 x 128 | bpe:2048 | 64 | 0.1 | 10-14 |
| 1.38-2.5 MB | 3 x 192 | bpe:2048 | 128 | 0.1 | 6-10 |
| 2.5-3.65 MB | 3 x 192 | bpe:4096 | 128 | 0.1 | 4-6 |
| 3.65-16 MB (the plays: 4.49) | **4 x 256** | **bpe:4096** | 128 | 0 | 0.4-2.2 (1.8) |
| over 16 MB | 4 x 256 | bpe:8192 | 128 | 0 | under 0.4 |

Larger corpora stay at 4 x 256 (530 s cannot feed more); a budget ~7x longer reaches 6 x 384.
Only rung 2 at bpe:4096, context 128, dropout 0 on the plays is measured; the rest is
extrapolation (benchmarks/corpora.py's kjv and fortunes fall in rungs 2 and 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptlab.config.schema import RunConfig, corpus_bpe_size
from gptlab.errors import GptlabError

ANCHOR_BUDGET_S = 530.0
ANCHOR_TOKENS_PER_S = 4800.0  # the anchor row's speed, on the development CPU (BENCHMARKS.md)
ANCHOR_TRAIN_TOKENS = 1.45e6  # the plays' training tokens at bpe:4096
ANCHOR_RUNG = 2
# (layers, width, heads, context)
RUNGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 128, 2, 64),
    (3, 192, 3, 128),
    (4, 256, 4, 128),
    (6, 384, 6, 256),
    (8, 512, 8, 256),
)
RUNG_TOLERANCE = 1.25
# (training bytes below which, BPE size); above the last: 8192
VOCAB_STEPS: tuple[tuple[float, int], ...] = ((1e6, 1024), (2.5e6, 2048), (16e6, 4096))
LARGEST_VOCAB = 8192
# bytes a token: 4096 measured on the plays (4.49 MB / 1.45M); the others estimated
BYTES_PER_TOKEN = {1024: 2.4, 2048: 2.8, 4096: 3.1, 8192: 3.4, "gpt2": 3.7, "char": 1.0}
FRESH_PASSES = 4.0
MAX_PASSES = 16.0
MAX_SPEEDUP = 2.0
_ENDOFTEXT = "<|endoftext|>"  # how a run joins the plays (gptlab.data.tokenizer)
# The config fields the rule chooses (each unless the user set it).
CHOSEN = (
    "model.n_layers",
    "model.emb_dim",
    "model.n_heads",
    "model.context_length",
    "model.drop_rate",
    "data.tokenizer",
    "train.max_time",
)


@dataclass(frozen=True)
class Choice:
    """What the rule chose for a corpus of `train_bytes` and a budget of `budget_s`."""

    train_bytes: float
    budget_s: float
    n_layers: int
    emb_dim: int
    n_heads: int
    context_length: int
    drop_rate: float
    tokenizer: str
    max_time: float
    passes: float
    rung: int
    speed: float = ANCHOR_TOKENS_PER_S  # this machine's tokens/s on the anchor shape
    speed_from: str = "given"  # where the speed came from, for the line

    def line(self, explicit: tuple[str, ...] = ()) -> str:
        """The one line that says what was chosen and why."""
        kept = f"; yours: {', '.join(explicit)}" if explicit else ""
        short = ""
        if self.max_time < self.budget_s:
            short = f", budget cut to {self.max_time:g} s ({MAX_PASSES:g} passes)"
        measured = " (the shape measured on the plays)" if self._is_anchor() else " (extrapolated)"
        return (
            f"gptlab: sizing: {self.train_bytes / 1e6:.2f} MB of training text, "
            f"{self.budget_s:g} s budget, {self.speed:,.0f} tokens/s ({self.speed_from}) -> "
            f"{self.n_layers} x {self.emb_dim}, "
            f"{self.tokenizer}, context {self.context_length}, dropout {self.drop_rate:g}, "
            f"~{self.passes:.2g} passes{short}{measured}{kept}; "
            "gptlab.recipes.sizing has the rule, --train.sizing preset keeps the preset"
        )

    def _is_anchor(self) -> bool:
        shape = (self.n_layers, self.emb_dim, self.context_length, self.tokenizer)
        return shape == (4, 256, 128, "bpe:4096") and self.drop_rate == 0.0

    def fields(self) -> dict[str, object]:
        """The chosen values by dotted config key (CHOSEN's)."""
        return {key: getattr(self, key.split(".")[1]) for key in CHOSEN}


def block_params(n_layers: int, emb_dim: int) -> float:
    """Weights in the transformer blocks: attention 4 d^2 and a 4x MLP 8 d^2 per layer."""
    return 12.0 * n_layers * emb_dim**2


def _flops_per_token(n_layers: int, emb_dim: int, vocab: int, context: int) -> float:
    matmul_weights = block_params(n_layers, emb_dim) + vocab * emb_dim  # blocks, untied head
    return 6.0 * matmul_weights + 12.0 * n_layers * (context * emb_dim)  # + attention's scores


def vocab_for(train_bytes: float) -> int:
    """The BPE size for this much training text (VOCAB_STEPS)."""
    return next((size for below, size in VOCAB_STEPS if train_bytes < below), LARGEST_VOCAB)


def _tokenizer_facts(tokenizer: str) -> tuple[int, float]:
    """(vocabulary rows, bytes a token) for a tokenizer name."""
    if tokenizer == "gpt2":
        return 50304, BYTES_PER_TOKEN["gpt2"]
    if tokenizer == "char":
        return 128, BYTES_PER_TOKEN["char"]
    size = corpus_bpe_size(tokenizer) or 4096  # a trained tokenizer.json: as bpe:4096
    nearest = min((k for k in BYTES_PER_TOKEN if isinstance(k, int)), key=lambda k: abs(k - size))
    return size, BYTES_PER_TOKEN[nearest]


def _rung(tokens: float, compute: float) -> int:
    """The index of the largest RUNGS shape (within RUNG_TOLERANCE) under both ceilings:
    the compute (`compute` x the anchor's) and the text (`tokens` training tokens)."""
    anchor = block_params(*RUNGS[ANCHOR_RUNG][:2])
    ceiling = min(anchor * math.sqrt(compute), anchor * tokens / ANCHOR_TRAIN_TOKENS)
    fits = [block_params(n, d) <= RUNG_TOLERANCE * ceiling for n, d, _, _ in RUNGS]
    return max((i for i, fit in enumerate(fits) if fit), default=0)


def _check_one_window(
    tokens: float, val_tokens: float, context: int, tokenizer: str, bpt: float
) -> None:
    """A GptlabError naming the fix when the training or validation text (in tokens of
    `bpt` bytes) is shorter than one window of context + 1 tokens."""
    for part, size in (("training", tokens), ("validation", val_tokens)):
        if size < context + 1:
            raise GptlabError(
                f"the corpus has ~{size * bpt:,.0f} bytes of {part} text, too few for one "
                f"window of {context + 1} tokens at {tokenizer} (~{(context + 1) * bpt:,.0f} "
                "bytes); give more text, or a smaller --model.context_length"
            )


def choose(
    train_bytes: float,
    budget_s: float,
    given: dict[str, object] | None = None,
    val_bytes: float | None = None,
    speed: float = ANCHOR_TOKENS_PER_S,
    speed_from: str = "given",
) -> Choice:
    """The rule (module docstring) for `train_bytes` of training text, a budget of `budget_s`
    seconds and a machine training the anchor shape at `speed` tokens/s; `given`'s dotted
    keys (the user's) are kept and the rest chosen around them. A GptlabError when the text
    is too small for one window of the chosen context."""
    given = given or {}
    tokenizer = str(given.get("data.tokenizer") or f"bpe:{vocab_for(train_bytes)}")
    vocab, bpt = _tokenizer_facts(tokenizer)
    tokens = train_bytes / bpt
    compute = budget_s * speed / (ANCHOR_BUDGET_S * ANCHOR_TOKENS_PER_S)
    rung = _rung(tokens, compute)
    layers, width, heads, context = RUNGS[rung]
    layers = int(given.get("model.n_layers", layers))
    if "model.emb_dim" in given:
        width = int(given["model.emb_dim"])
        heads = next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)
    heads = int(given.get("model.n_heads", heads))
    context = int(given.get("model.context_length", context))
    _check_one_window(tokens, (val_bytes or tokens * bpt) / bpt, context, tokenizer, bpt)
    anchor_flops = _flops_per_token(4, 256, 4096, 128)
    speedup = min(anchor_flops / _flops_per_token(layers, width, vocab, context), MAX_SPEEDUP)
    tokens_per_s = speed * speedup
    passes = budget_s * tokens_per_s / tokens
    drop = 0.0 if passes <= FRESH_PASSES else 0.1 if passes <= MAX_PASSES else 0.2
    drop = float(given.get("model.drop_rate", drop))
    max_time = budget_s
    if "train.max_time" not in given and passes > MAX_PASSES:
        max_time = min(max(round(MAX_PASSES * tokens / tokens_per_s), 10.0), budget_s)
    return Choice(
        train_bytes,
        budget_s,
        layers,
        width,
        heads,
        context,
        drop,
        tokenizer,
        float(max_time),
        passes,
        rung,
        speed,
        speed_from,
    )


def size_run(
    cfg: RunConfig, train_bytes: float, given_keys: set[str], speed_from: str = "given"
) -> Choice:
    """Apply the rule to `cfg` in place, at `cfg.train.sizing_speed`: each CHOSEN field not in
    `given_keys` (dotted) takes the rule's value. Returns the choice."""
    given = {k: _get(cfg, k) for k in CHOSEN if k in given_keys}
    val_bytes = train_bytes * (1 - cfg.data.train_ratio) / cfg.data.train_ratio
    choice = choose(
        train_bytes, cfg.train.max_time, given, val_bytes, cfg.train.sizing_speed, speed_from
    )
    for key, value in choice.fields().items():
        if key not in given:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return choice


def _get(cfg: RunConfig, dotted: str) -> object:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def corpus_bytes(source: str) -> float | None:
    """The bytes of text `source` names (files, or the built-in plays joined as a run reads
    them); None for hf: datasets and a `gptlab prepare` directory (its tokenizer is fixed)."""
    from pathlib import Path

    from gptlab.data.sources import expand_inputs, shakespeare_plays

    if (Path(source).expanduser() / "manifest.json").is_file():
        return None
    sources = expand_inputs([source])
    if any(s.kind == "hf" for s in sources):
        return None
    total = 0.0
    for s in sources:
        if s.kind == "builtin":
            plays = shakespeare_plays()
            total += sum(len(p.encode()) for p in plays) + len(_ENDOFTEXT) * (len(plays) - 1)
        else:
            total += s.bytes
    return total
