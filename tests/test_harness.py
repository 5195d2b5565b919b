"""lm-evaluation-harness's model `gptlab` (gptlab.evals.harness), run by lm-eval itself on local
tasks (YAML files whose datasets are jsonl files written here; nothing is downloaded).

The references: `gptlab eval --task` on the same items (accuracies), lm-eval's own `hf`
model on the `gptlab convert to-hf` export of the same weights (every log-likelihood, the
perplexities), `gptlab generate` (greedy text), and the rolling log-likelihood written out
plainly, window by window, as lm-eval's docstring defines it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import jitter

pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed: pip install 'gptlab[eval]'"
)

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gptlab.cli.main import lm_eval_main, main  # noqa: E402
from gptlab.config.schema import ModelConfig, RunConfig  # noqa: E402
from gptlab.data.tokenizer import GPT2Tokenizer  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.evals.harness import GptlabLM  # noqa: E402
from gptlab.interop import checkpoint as ckpt_lib  # noqa: E402
from gptlab.interop import hf  # noqa: E402
from gptlab.model.gpt import GPTModel  # noqa: E402

T = 32  # the model's context: the long items below are cut, the long text takes 3 windows
MAX_GEN = 6

DATA = Path(__file__).parent / "data" / "lm_eval"  # the tasks' items, written for these tests


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


# multiple choice in gptlab's `mc` format (one context too long for T: it is cut)
MC_ITEMS = _jsonl("mc.jsonl")
ROLL_TEXTS = [r["text"] for r in _jsonl("roll.jsonl")]  # the second takes 3 windows
GEN_PROMPTS = [r["prompt"] for r in _jsonl("gen.jsonl")]


def _yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(cache))}\n"
        "test_split: test\n" + body
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A gptlab run with random GPT-2-tokenizer weights, its Hugging Face export, and a
    folder of three lm-eval task YAMLs over the jsonl files in tests/data/lm_eval: multiple
    choice (the same file is gptlab's `mc` format), rolling log-likelihood, and greedy
    generation."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50257, context_length=T, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    ).validate()
    model = jitter(GPTModel(cfg).eval(), 0.1)
    meta = {"config": RunConfig(model=cfg).to_dict(), "tokenizer": {"type": "gpt2"}}
    ckpt_lib.save_checkpoint(root / "run", 1, model, meta)
    hf.convert_to_hf(root / "run", root / "hf")

    tasks, cache = root / "tasks", root / "hf-datasets"
    tasks.mkdir()
    mc = DATA / "mc.jsonl"
    (tasks / "gptlab_mc.yaml").write_text(
        _yaml(
            "gptlab_mc",
            mc,
            cache,
            "output_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{answer}}"\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        )
    )
    roll = DATA / "roll.jsonl"
    (tasks / "gptlab_roll.yaml").write_text(
        _yaml(
            "gptlab_roll",
            roll,
            cache,
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n",
        )
    )
    gen = DATA / "gen.jsonl"
    (tasks / "gptlab_gen.yaml").write_text(
        _yaml(
            "gptlab_gen",
            gen,
            cache,
            "output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\n'
            'doc_to_target: "{{answer}}"\n'
            "generation_kwargs:\n"
            f'  until: ["\\n", "."]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n",
        )
    )
    return {"root": root, "run": root / "run", "hf": root / "hf", "tasks": tasks, "mc": mc}


def _evaluate(files, model: str, model_args: dict, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(files["tasks"]), include_defaults=False),
        batch_size=4,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


@pytest.fixture(scope="module")
def ours(files) -> dict:
    return _evaluate(
        files,
        "gptlab",
        {"checkpoint": str(files["run"])},
        ["gptlab_mc", "gptlab_roll", "gptlab_gen"],
    )


@pytest.fixture(scope="module")
def theirs(files) -> dict:
    """lm-eval's Hugging Face model on the exported weights: the independent reference."""
    args = {"pretrained": str(files["hf"]), "dtype": "float32"}
    return _evaluate(files, "hf", args, ["gptlab_mc", "gptlab_roll"])


def _resps(result: dict, task: str) -> list[list]:
    """Per document (in order): its responses, as lm-eval logged them."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def _gptlab_eval(capsys, run: Path, task_file: Path) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--task", str(task_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (only,) = report["tasks"].values()
    return only


# --------------------------------------------------------------------------- multiple choice


def test_lm_eval_accuracies_equal_gptlab_eval_task(ours, files, capsys):
    got = ours["results"]["gptlab_mc"]
    want = _gptlab_eval(capsys, files["run"], files["mc"])
    assert want["n_items"] == len(MC_ITEMS) and want["n_truncated"] == 1  # the long item is cut
    assert got["acc,none"] == pytest.approx(want["acc"], abs=1e-12)
    assert got["acc_norm,none"] == pytest.approx(want["acc_norm"], abs=1e-12)


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_exported_weights(ours, theirs):
    mine, ref = _resps(ours, "gptlab_mc"), _resps(theirs, "gptlab_mc")
    assert [len(d) for d in mine] == [len(i["choices"]) for i in MC_ITEMS]
    for doc_mine, doc_ref in zip(mine, ref, strict=True):
        for (lp, greedy), (lp_ref, greedy_ref) in zip(doc_mine, doc_ref, strict=True):
            assert lp == pytest.approx(lp_ref, abs=1e-4)
            assert bool(greedy) == bool(greedy_ref)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["gptlab_mc"][metric] == theirs["results"]["gptlab_mc"][metric]


# --------------------------------------------------------------------------- rolling


def _plain_rolling(model: GPTModel, ids: list[int], eot: int) -> float:
    """Every token's log-probability once, the first after <|endoftext|>; the tokens are
    taken T at a time, each chunk read with the T tokens before its end (so the last chunk
    sees a full context), one sequence per forward pass."""
    seq = [eot, *ids]  # seq[j + 1] is ids[j]
    total = 0.0
    for start in range(0, len(ids), T):
        end = min(start + T, len(ids))
        lo = max(0, end - T)
        x = torch.tensor([seq[lo:end]])  # predicts seq[lo + 1 : end + 1]
        logp = torch.log_softmax(model(x)[0].double(), dim=-1)  # (len, V)
        for j in range(start, end):  # ids[j] is predicted at position j - lo
            total += logp[j - lo, ids[j]].item()
    return total


def test_rolling_loglikelihood_is_the_plain_sum_of_token_logprobs(files):
    lm = GptlabLM(checkpoint=str(files["run"]), device="cpu", batch_size=2)
    tok = GPT2Tokenizer()
    assert len(tok.encode(ROLL_TEXTS[1])) > 2 * T  # three windows
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(ROLL_TEXTS)]
    got = lm.loglikelihood_rolling(reqs)
    for text, lp in zip(ROLL_TEXTS, got, strict=True):
        want = _plain_rolling(lm.model, tok.encode(text), tok.eot_token)
        assert lp == pytest.approx(want, abs=1e-4)
        assert lp < 0


def test_perplexities_equal_lm_evals_hf_model(ours, theirs):
    for doc_mine, doc_ref in zip(
        _resps(ours, "gptlab_roll"), _resps(theirs, "gptlab_roll"), strict=True
    ):
        assert doc_mine[0] == pytest.approx(doc_ref[0], abs=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, want = ours["results"]["gptlab_roll"][metric], theirs["results"]["gptlab_roll"][metric]
        assert got == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- generation


def test_generate_until_is_gptlab_generates_greedy_text(ours, files, capsys):
    got = [d[0] for d in _resps(ours, "gptlab_gen")]
    for prompt, text in zip(GEN_PROMPTS, got, strict=True):
        capsys.readouterr()
        argv = ["generate", "--checkpoint", str(files["run"]), "--temperature", "0"]
        argv += [
            "--max-new-tokens",
            str(MAX_GEN),
            "--stop",
            "\n",
            "--stop",
            ".",
            "--prompt",
            prompt,
        ]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(prompt) and out.endswith("\n")
        assert text == out[len(prompt) : -1]
    assert any(got)  # some text came out at all


def test_generate_until_batches_prompts_of_one_length_as_one_at_a_time(files):
    lm = GptlabLM(checkpoint=str(files["run"]), device="cpu", batch_size=4)
    kw = {"until": ["zzz"], "max_gen_toks": 5, "do_sample": False}
    prompts = ["one two three", "four five six", "seven eight nine", "ten"]
    reqs = [Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)]
    together = lm.generate_until(reqs)
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert together == alone
    tok = GPT2Tokenizer()
    assert all(0 < len(tok.encode(t)) <= 5 for t in together)  # max_gen_toks, no stop string


def test_generate_until_stops_before_the_first_stop_string(files):
    """A stop string taken from the middle of the unstopped greedy text: the text comes back
    cut just before its first occurrence, and the stop string is not in it."""
    lm = GptlabLM(checkpoint=str(files["run"]), device="cpu", batch_size=2)

    def gen(until: list[str]) -> str:
        kw = {"until": until, "max_gen_toks": MAX_GEN, "do_sample": False}
        return lm.generate_until([Instance("generate_until", {}, (GEN_PROMPTS[0], kw), 0)])[0]

    full = gen(["\x00never"])
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = gen([stop])
    assert cut == full[: full.find(stop)]
    assert stop not in cut and len(cut) < len(full)
    assert gen(["\x00never", full[-1]]) == full[: full.find(full[-1])]  # any of several


# --------------------------------------------------------------------------- the console command


def test_the_lm_eval_console_command_gives_the_same_scores(ours, files):
    script = Path(sys.executable).parent / "gptlab-lm-eval"
    if not script.exists():
        pytest.skip("gptlab is not installed with its console scripts (pip install -e .)")
    out = files["root"] / "cli-out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(files["root"] / "hf-home"),
    }
    argv = [str(script), "--model", "gptlab", "--model_args", f"checkpoint={files['run']}"]
    argv += ["--tasks", "gptlab_mc", "--include_path", str(files["tasks"]), "--batch_size", "3"]
    argv += ["--device", "cpu"]
    argv += ["--output_path", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = list(out.rglob("results_*.json"))
    got = json.loads(report.read_text())["results"]["gptlab_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        assert got[metric] == ours["results"]["gptlab_mc"][metric]


def test_bad_model_args_are_one_line_errors(files, tmp_path):
    run = str(files["run"])
    with pytest.raises(GptlabError, match="needs a checkpoint"):
        GptlabLM()
    with pytest.raises(GptlabError, match="exceeds the model's context of 32"):
        GptlabLM(checkpoint=run, device="cpu", max_length=64)
    with pytest.raises(GptlabError, match="precision 'int8'"):
        GptlabLM(checkpoint=run, device="cpu", dtype="int8")
    with pytest.raises(GptlabError, match="batch_size must be"):
        GptlabLM(checkpoint=run, device="cpu", batch_size="0")
    with pytest.raises(GptlabError):
        GptlabLM(checkpoint=str(tmp_path / "nothing-here"), device="cpu")
    lm = GptlabLM(checkpoint=run, device="cpu", batch_size="auto", dtype="float32")
    assert (lm.batch_size, lm.precision, lm.max_length) == (16, "fp32", T)
    req = Instance("generate_until", {}, ("hi", {"max_gen_toks": T, "until": []}), 0)
    with pytest.raises(GptlabError, match="leaves no room"):
        lm.generate_until([req])


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error" in x.lower()]
    assert line.startswith("gptlab-lm-eval: error: ")
    return line


def test_console_command_bad_checkpoint_is_one_line_exit_2(monkeypatch, capsys, files):
    missing = files["root"] / "no-such-run"
    argv = ["gptlab-lm-eval", "--model", "gptlab", "--model_args", f"checkpoint={missing}"]
    argv += ["--tasks", "gptlab_mc", "--include_path", str(files["tasks"]), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    assert lm_eval_main() == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "does not exist" in line


def test_console_command_without_lm_eval_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if lm-eval were absent
    capsys.readouterr()
    assert lm_eval_main() == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "lm-evaluation-harness (lm_eval) is not installed" in line
    assert "pip install 'gptlab[eval]'" in line
