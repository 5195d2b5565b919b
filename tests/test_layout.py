"""The package's layering: each module imports only modules below it in LAYERS.

The order is written down here, once. A change that wants an import the other way is a
design question (move the code down, or pass the object in), not a reason to edit this
list in passing. Function-level imports count too; imports under `if TYPE_CHECKING:` do
not (they are types only, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gptlab"

# Bottom (imports nothing of gptlab) to top (the command line).
LAYERS = (
    "errors",  # the one exception type users see
    "atomic",  # writing a small file whole or not at all (temporary file, fsync, rename)
    "config",  # typed dataclasses, presets, TOML, overrides, validation
    "model",  # GPTModel: token ids -> logits; parameter and FLOP counts
    "loss",  # the loss paths (full logits, chunked); no gptlab imports, finetune's too)
    "tokenizer",  # GPT-2 BPE, char-level, trained BPE
    "bpe",  # training byte-level BPEs
    "chat",  # chat templates: messages -> ids and mask; growing a base by their tokens
    "sources",  # reading documents from files, directories, globs, jsonl, parquet, hf:
    "data",  # documents -> tokens -> corpora, prepared shards, loaders
    "finetune",  # finetuning records -> rendered examples -> padded or packed batches; losses
    "lora",  # LoRA adapters on a frozen GPTModel: add, save what trains, merge; base hash
    "prepare",  # gptlab prepare: parallel, resumable sharding
    "optim",  # parameter groups, optimizers, lr schedule
    "budget",  # a time budget: progress, when it is spent, the recorded schedule
    "runtime",  # device, precision, compile and host-memory policy; speed facts
    "sizing",  # the cpu default's shape, tokenizer and dropout from corpus, budget and speed
    "dist",  # torchrun environment, DDP / FSDP2, rank helpers
    "generate",  # sampling, KV cache, streaming
    "engine",  # continuous batching: many generations share the model's forward passes
    "evaluate",  # calc_loss_*, evaluate_model (rank-aware), perplexity, bits per byte
    "tasks",  # downstream tasks by log-likelihood: multiple choice, cloze, suites, CORE
    "checkpoint",  # atomic, versioned checkpoints
    "resume",  # what may change on resume; RNG state
    "metrics",  # metrics.jsonl
    "threads",  # how many CPU threads torch uses: cores, programs running, reserve, resume
    "plot",  # figures from metrics.jsonl
    "trackers",  # optional trackers fed the metrics records: TensorBoard, wandb, trackio
    "hf",  # Hugging Face GPT-2 and Llama weights, both ways
    "runs",  # open a gptlab run or a Hugging Face folder
    "trainer",  # the loop, and train()
    "finetune_run",  # gptlab finetune: a base model, records, the Trainer; eval of such runs
    "serve",  # the OpenAI-compatible HTTP server and its page
    "console",  # progress views for the terminal
    "harness",  # lm-evaluation-harness's model `gptlab`
    "cli",  # argv -> library calls -> one-line errors and exit codes
)
ENTRY_POINTS = ("__init__", "__main__")  # the package itself and `python -m gptlab`


def _gptlab_imports(path: Path) -> list[tuple[int, str]]:
    """(line, gptlab module) for every import of a gptlab module in the file, at any depth,
    except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gptlab":  # `from gptlab import checkpoint` or `__version__`
                names = [f"gptlab.{a.name}" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "gptlab" and len(parts) > 1 and parts[1] in LAYERS:
                found.append((node.lineno, parts[1]))
    return found


def test_every_module_has_a_place_in_the_layers():
    modules = {p.stem for p in SRC.glob("*.py")} - set(ENTRY_POINTS)
    assert modules - set(LAYERS) == set(), "add the new module to LAYERS, where it belongs"
    assert set(LAYERS) - modules == set(), "a module in LAYERS no longer exists"


@pytest.mark.parametrize("module", LAYERS)
def test_imports_point_down(module):
    rank = LAYERS.index(module)
    upward = [
        f"{module}.py:{line} imports {target}"
        for line, target in _gptlab_imports(SRC / f"{module}.py")
        if LAYERS.index(target) >= rank
    ]
    assert upward == []


def test_the_checker_sees_function_level_imports(tmp_path):
    """The rule would be toothless if imports inside functions went unseen."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gptlab.cli import main\n"
        "def g():\n    from gptlab import trainer\n    import gptlab.hf\n"
        "from gptlab import __version__\n"
    )
    assert _gptlab_imports(f) == [(5, "trainer"), (6, "hf")]


def test_the_readme_layout_lists_the_layers_in_their_order():
    """A newcomer reads the layering in the README's Layout section; it names every
    module, in LAYERS' order, so the two cannot drift apart."""
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = [
        line.split()[0].removesuffix(".py")
        for line in block.splitlines()
        if line.startswith("  ") and not line.startswith("   ") and line.split()[0].endswith(".py")
    ]
    assert listed == list(LAYERS)
