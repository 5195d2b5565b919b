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

# Bottom (imports nothing of gptlab) to top (the command line): the packages by stage, each
# with its modules in their own order. A module may import any module of a package below
# its own, and the modules before it in its own package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ()),  # the one exception type users see
    ("atomic", ()),  # writing a file whole or not at all (temporary file, fsync, rename)
    ("config", ("fields", "model", "runtime", "schema")),
    ("observe", ("metrics", "console", "plot", "trackers")),
    ("model", ("kvcache", "gpt", "vocab", "loss", "lora")),
    (
        "data",
        ("tokenizer", "bpe", "chat", "records", "cuts", "sources", "shards", "corpus", "prepare"),
    ),
    ("runtime", ("device", "dist", "threads")),
    ("recipes", ("presets", "sizing")),
    ("interop", ("checkpoint", "hf_format", "hf", "runs")),
    ("infer", ("sampling", "engine", "chat", "api", "serve")),
    ("evals", ("loss", "scoring", "items", "tasks", "harness")),
    (
        "train",
        (
            "optim",
            "budget",
            "resume",
            "walkthrough",
            "resolve",
            "objectives",
            "average",
            "checkpointer",
            "evaluator",
            "report",
            "loop",
            "run",
        ),
    ),
    ("finetune", ("data", "objectives", "run")),
    ("cli", ("args", "run", "tools", "main")),
)
ENTRY_POINTS = ("__init__", "__main__")  # the package itself and `python -m gptlab`

# every module as (package rank, module rank): "train.loop" -> (11, 4); "errors" -> (0, 0)
RANK = {
    (f"{pkg}.{mod}" if mod else pkg): (i, j)
    for i, (pkg, mods) in enumerate(LAYERS)
    for j, mod in enumerate(mods or ("",))
}


def _module_name(path: Path) -> str:
    """src/gptlab/train/loop.py -> "train.loop"; src/gptlab/errors.py -> "errors"."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(dotted: str) -> str | None:
    """The listed module that importing gptlab.`dotted` runs, or None for the package itself."""
    parts = dotted.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return parts[0] if parts[0] in {pkg for pkg, _ in LAYERS} else None


def _gptlab_imports(path: Path, module: str = "") -> list[tuple[int, str]]:
    """(line, gptlab module) for every import of a gptlab module in the file, at any depth,
    absolute or relative (`from . import x`, `from ..model import gpt`), except under
    `if TYPE_CHECKING:`. `module` is the file's own dotted name, for relative imports."""
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
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = ["gptlab", *module.split(".")[: -1 if path.stem != "__init__" else None]]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if not (base == "gptlab" or base.startswith("gptlab.")):
                continue
            # `from gptlab.train import loop` imports the module gptlab.train.loop
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "gptlab" or len(parts) < 2:
                continue
            target = _target(".".join(parts[1:]))
            if target is not None:
                found.append((node.lineno, target))
    return sorted(found)


def _listed() -> set[str]:
    return set(RANK)


def test_every_module_has_a_place_in_the_layers():
    modules = {
        _module_name(p) for p in SRC.rglob("*.py") if p.stem not in ENTRY_POINTS or p.parent != SRC
    } - {pkg for pkg, mods in LAYERS if mods}  # a package's __init__ is its docstring
    assert modules - _listed() == set(), "add the new module to LAYERS, where it belongs"
    assert _listed() - modules == set(), "a module in LAYERS no longer exists"


def test_package_inits_hold_only_their_docstring():
    """A package's name says its job in its docstring; importing it runs nothing (so
    `gptlab --help` stays free of torch, and no import cycle hides in an __init__)."""
    for pkg, mods in LAYERS:
        if mods:
            body = ast.parse((SRC / pkg / "__init__.py").read_text(encoding="utf-8")).body
            assert len(body) == 1 and isinstance(body[0], ast.Expr), pkg


@pytest.mark.parametrize("module", list(RANK))
def test_imports_point_down(module):
    path = SRC / (module.replace(".", "/") + ".py")
    rank = RANK[module]
    upward = [
        f"{module}:{line} imports {target}"
        for line, target in _gptlab_imports(path, module)
        if target != module
        and not (
            RANK[target][0] < rank[0] or (RANK[target][0] == rank[0] and RANK[target][1] < rank[1])
        )
    ]
    assert upward == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The rule would be toothless if imports inside functions, or relative ones, went unseen."""
    f = tmp_path / "loop.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gptlab.cli.main import main\n"
        "def g():\n    from gptlab.train import loop\n    import gptlab.interop.hf\n"
        "from gptlab import __version__\n"
        "from . import optim\n"
        "from ..finetune.data import FinetuneData\n"
        "from .. import errors\n"
    )
    assert _gptlab_imports(f, "train.loop") == [
        (5, "train.loop"),
        (6, "interop.hf"),
        (8, "train.optim"),
        (9, "finetune.data"),
        (10, "errors"),
    ]


def test_the_readme_layout_lists_the_layers_in_their_order():
    """A newcomer reads the layering in the README's Layout section; it names every
    package and module, in LAYERS' order, so the two cannot drift apart."""
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, package = [], None
    for line in block.splitlines():
        words = line.split()
        if not words or not line.startswith("  "):
            continue
        if not line.startswith("   ") and words[0].endswith("/"):
            package = words[0].removesuffix("/")
            listed.append(package)
        elif not line.startswith("   ") and words[0].endswith(".py"):
            package = None
            listed.append(words[0].removesuffix(".py"))
        elif (
            package
            and line.startswith("    ")
            and not line.startswith("     ")
            and words[0].endswith(".py")
        ):
            listed.append(f"{package}.{words[0].removesuffix('.py')}")
    want = [name for pkg, mods in LAYERS for name in (pkg, *(f"{pkg}.{m}" for m in mods))]
    assert listed == want


def test_modules_and_functions_stay_small_enough_to_read():
    """Issue 33's sizes, kept: no module over 600 lines, no function over 60 (from `def` to
    its last line, docstring included), the Trainer's loop class under 300."""
    long_modules, long_functions = [], []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(SRC)
        if len(text.splitlines()) > 600:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
            if isinstance(node, ast.ClassDef) and node.name == "Trainer":
                assert node.end_lineno - node.lineno + 1 < 300, "the Trainer grew past 300 lines"
    assert long_modules == [] and long_functions == []
