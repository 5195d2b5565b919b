"""Downstream tasks by log-likelihood (gptlab.evals.tasks): the scoring core against a plain
reference, batched against one at a time, lm-eval's tokenisation, the task formats, suites
and the centred score, bad input, and a model overfit on a sentence choosing it."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import jitter

from gptlab.cli.main import main
from gptlab.config.schema import ModelConfig
from gptlab.data.tokenizer import GPT2Tokenizer
from gptlab.errors import GptlabError
from gptlab.evals.items import load_items
from gptlab.evals.scoring import Score, encode_pair, score_requests
from gptlab.evals.tasks import (
    DEFAULT_SEED,
    Suite,
    _requests,
    centred,
    chance,
    fewshot_context,
    load_suite,
    make_task,
    run_suite,
    run_task,
)
from gptlab.interop.runs import open_run
from gptlab.model.gpt import GPTModel

T = 16


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, context_length=T, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return jitter(GPTModel(cfg), 0.2).eval()


def _plain_score(model, context, continuation, eot=96) -> Score:
    """The log-likelihood written out: one sequence, left-cut to T inputs, one position at
    a time."""
    whole = (list(context) or [eot]) + list(continuation)
    x = whole[-(T + 1) :][:-1]
    logits = model(torch.tensor([x]))[0]  # (len(x), V)
    total, greedy = 0.0, True
    for j, tok in enumerate(continuation):
        pos = len(x) - len(continuation) + j
        logp = torch.log_softmax(logits[pos].double(), dim=-1)
        total += logp[tok].item()
        greedy &= int(logits[pos].argmax()) == tok
    return Score(total, greedy, len(continuation), len(whole) - 1 > T)


def _random_requests(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = [rng.randrange(96) for _ in range(rng.randint(0, 24))]
        cont = [rng.randrange(96) for _ in range(rng.randint(1, 5))]
        reqs.append((ctx, cont))
    reqs.append((reqs[0][0], reqs[0][1][:1]))  # one-token choices of one context share a row
    reqs.append((reqs[0][0], [(reqs[0][1][0] + 1) % 96]))
    return reqs


@pytest.fixture(scope="module")
def capped_model() -> GPTModel:
    """Soft-capped logits over a padded vocabulary: the head-on-scored-positions path must
    keep both as `forward` does."""
    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=97, context_length=T, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
        logit_softcap=3.0, vocab_multiple=64, tie_weights=False,
    )  # fmt: skip
    return jitter(GPTModel(cfg), 0.2).eval()


def _logprobs(scores) -> torch.Tensor:
    return torch.tensor([s.logprob for s in scores], dtype=torch.float64)


@pytest.mark.parametrize("which", ["model", "capped_model"])
def test_score_matches_the_plain_computation(which, request):
    model = request.getfixturevalue(which)
    reqs = _random_requests(12)
    got = score_requests(model, reqs, context_length=T, batch_size=4, eot_id=96)
    refs = [_plain_score(model, ctx, cont) for ctx, cont in reqs]
    for s, ref in zip(got, refs, strict=True):
        assert (s.greedy, s.n_tokens, s.truncated) == (ref.greedy, ref.n_tokens, ref.truncated)
    # batched rows and a sum over the continuation: other orders than the plain forward's
    exact = [_plain_score(copy.deepcopy(model).double(), ctx, cont) for ctx, cont in reqs]
    tolerances.assert_close_to_rounding(*(_logprobs(r) for r in (got, refs, exact)))
    assert any(s.truncated for s in got) and not all(s.truncated for s in got)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_equals_one_at_a_time(model, batch_size):
    reqs = _random_requests(20, seed=1)
    alone = [score_requests(model, [r], context_length=T, eot_id=96)[0] for r in reqs]
    batched = score_requests(model, reqs, context_length=T, batch_size=batch_size, eot_id=96)
    for a, b in zip(alone, batched, strict=True):
        assert (a.greedy, a.n_tokens, a.truncated) == (b.greedy, b.n_tokens, b.truncated)
    exact = score_requests(copy.deepcopy(model).double(), reqs, context_length=T, eot_id=96)
    tolerances.assert_close_to_rounding(*(_logprobs(r) for r in (batched, alone, exact)))


def test_greedy_is_true_when_the_continuation_is_the_argmax(model):
    ctx = [5, 6, 7]
    conts = []
    seq = list(ctx)
    for _ in range(3):  # greedy decoding, three tokens
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        conts.append(nxt)
        seq.append(nxt)
    s_greedy, s_other = score_requests(
        model, [(ctx, conts), (ctx, conts[:2] + [(conts[2] + 1) % 97])], context_length=T
    )
    assert s_greedy.greedy and not s_other.greedy


def test_empty_context_needs_eot_and_continuation_must_fit(model):
    with pytest.raises(GptlabError, match="eot_id"):
        score_requests(model, [([], [1])], context_length=T)
    with pytest.raises(GptlabError, match="does not fit"):
        score_requests(model, [([1], list(range(T + 1)))], context_length=T)
    s = score_requests(model, [([], [3])], context_length=T, eot_id=96)[0]
    assert s.logprob == pytest.approx(_plain_score(model, [96], [3]).logprob, abs=1e-5)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole():
    tok = GPT2Tokenizer()
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat")
    assert ctx == tok.encode("The cat sat on the")
    assert cont == tok.encode(" mat")  # the space belongs to the continuation
    ctx, cont = encode_pair(tok, "Question: 2+2\nAnswer:", " four")
    assert ctx + cont == tok.encode("Question: 2+2\nAnswer: four")
    assert encode_pair(tok, "", "Hello") == ([tok.eot_token], tok.encode("Hello"))


# --------------------------------------------------------------------------- formats

DATA = Path(__file__).parent / "data" / "tasks"


def test_hellaswag_is_preprocessed_as_lm_eval_does():
    fmt, items = load_items(str(DATA / "hellaswag.jsonl"))
    assert fmt == "hellaswag" and len(items) == 4
    # activity_label: ctx_a + " " + ctx_b capitalised
    assert items[0].context == "Baking bread: A man kneads dough on a floured table. He"
    assert items[0].choices[0] == "shapes it into a round loaf and sets it aside to rise."
    assert [it.answer for it in items] == [0, 1, 0, 2]  # labels as strings or ints
    # WikiHow artefacts: " [title]" becomes ". ", other [tags] go, double spaces close up
    assert items[2].context == "Home and Garden: How to water a fern. Check the soil."
    # lm-eval strips before removing a leading "[step]", so its space stays (faithfully)
    assert items[2].choices[0] == " Push a finger into the soil to feel whether it is dry."
    assert items[2].delimiter == " "
    only_ctx = {"ctx": "A man kneads dough. he", "endings": ["a", "b"], "label": 1}
    assert _parse("hellaswag", only_ctx).context == "A man kneads dough. he"


def test_arc_in_both_published_layouts_with_letter_and_digit_keys():
    fmt, items = load_items(str(DATA / "arc.jsonl"))
    assert fmt == "arc"
    assert items[0].context == (
        "Question: Which of these is needed for a plant to make its own food?\nAnswer:"
    )
    assert items[0].choices == ["sunlight", "sand", "plastic", "noise"]
    assert [it.answer for it in items] == [0, 1, 1]  # "A", "2" among 1..3, "B"


def test_piqa_copa_lambada_and_gptlab_jsonl():
    _, piqa = load_items(str(DATA / "piqa.jsonl"))
    assert piqa[1].context == "Question: How do you open a jar whose lid is stuck?\nAnswer:"
    assert piqa[1].answer == 1 and len(piqa[1].choices) == 2
    _, copa = load_items(str(DATA / "copa.jsonl"))
    assert copa[0].context == "The man turned on the lamp therefore"
    assert copa[1].context == "The girl's shoes were wet because"
    assert copa[0].choices == [" the room became bright.", " the room became cold."]
    assert copa[0].delimiter == ""  # the choice carries its space: one, not lm-eval's two
    fmt, lam = load_items(str(DATA / "lambada.jsonl"))
    assert fmt == "lambada"
    assert lam[0].context.endswith("poured the water into the cup and made her")
    assert lam[0].choices == [" tea"] and lam[0].delimiter == ""
    fmt, mc = load_items(str(DATA / "mc.jsonl"))
    assert fmt == "mc" and mc[1].answer == 1 and mc[1].delimiter == " "


def test_the_tokens_scored_are_lm_evals():
    """ARC's choice is " sunlight" after "...\\nAnswer:", encoded whole and split."""
    tok = GPT2Tokenizer()
    task = make_task(str(DATA / "arc.jsonl"))
    reqs, owner = _requests(task, tok, [0], DEFAULT_SEED, 1024)
    ctx, cont = reqs[0]
    assert ctx == tok.encode(task.items[0].context)
    assert cont == tok.encode(task.items[0].context + " sunlight")[len(ctx) :]
    assert tok.decode(cont) == " sunlight" and owner == [0, 0, 0, 0]


def _parse(fmt: str, rec: dict):
    from gptlab.evals.items import _PARSERS

    return _PARSERS[fmt](rec)


# --------------------------------------------------------------------------- bad input


def _write(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


MC_OK = {"context": "The cat sat", "choices": ["on the mat.", "in the sky."], "answer": 0}


@pytest.mark.parametrize(
    "records, task, problem",
    [
        ([{"question": 1, "foo": 2}], None, "items.jsonl:1: cannot tell the format from its fields"),
        ([MC_OK, {"context": "A", "choices": ["b", "c"], "answer": 2}], "mc", "items.jsonl:2: item 2"),
        ([MC_OK, {"context": "A", "choices": [], "answer": 0}], "mc", "choices is empty"),
        ([], "mc", "holds no records"),
        ([MC_OK, "{not json"], "mc", "items.jsonl:2: malformed JSON"),
        ([{"ctx": "x", "endings": ["a", "b"]}], "hellaswag", "items.jsonl:1: item 1: label None"),
        ([MC_OK], "arc", "items.jsonl:1: item 1: missing field 'question'"),
        ([{"goal": "g", "sol1": "a", "sol2": "b"}], "piqa", "separate .lst"),
        ([{"text": "oneword"}], "lambada", "at least two words"),
        ([{"context": "A", "choices": ["b " * 40, "c"], "answer": 0}], "mc", "with nothing left"),
    ],
    ids=[
        "wrong-format", "answer-out-of-range", "empty-choices", "zero-items", "bad-json",
        "no-label", "arc-without-question", "piqa-without-label", "lambada-one-word",
        "choice-longer-than-context",
    ],
)  # fmt: skip
def test_bad_task_files_are_one_line_errors_and_no_report(
    tiny_run, tmp_path, capsys, records, task, problem
):
    data = _write(tmp_path / "items.jsonl", records)
    out = tmp_path / "report.json"
    args = ["eval", "--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu"]
    args += ["--task", task, "--task-data", str(data)] if task else ["--task", str(data)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gptlab: error: ")
    assert problem in err
    if records:  # every message about an item names the file
        assert str(data) in err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


def test_bad_suites_and_flags_are_one_line_errors(tiny_run, tmp_path, capsys):
    _write(tmp_path / "mc.jsonl", [MC_OK, MC_OK])
    cases = {
        "[[tasks]]\ndata = 'mc.jsonl'\nshots = 3\n": "unknown key 'shots'",
        "[[tasks]]\ndata = 'missing.jsonl'\n": "not found",
        "name = 'x'\n": "no [[tasks]] tables",
        "[[tasks]]\ndata = 'mc.jsonl'\nnum_fewshot = 2\n": "only 1 other items",
        "[[tasks]]\ndata = 'mc.jsonl'\nmetric = 'f1'\n": "metric 'f1'",
        "[[tasks]]\ndata = 'mc.jsonl'\n[[tasks]]\ndata = 'mc.jsonl'\n": "a second task named",
        "[[tasks\n": "not valid TOML",
    }
    for text, problem in cases.items():
        suite = tmp_path / "suite.toml"
        suite.write_text(text)
        assert main(["eval", "--checkpoint", str(tiny_run), "--suite", str(suite)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err, (text, err)
    for args, problem in [
        (["--task", "hellaswag"], "needs its items: --task-data"),
        (["--task", "squad", "--task-data", "x.jsonl"], "no known format"),
        (["--task-data", "x.jsonl"], "go with --task or --suite"),
        (["--task", "mc", "--task-data", str(tmp_path / "mc.jsonl"), "--out", str(tmp_path)], "is a directory"),
    ]:  # fmt: skip
        assert main(["eval", "--checkpoint", str(tiny_run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err, (args, err)


# --------------------------------------------------------------------------- the CLI


def test_cli_scores_a_task_and_writes_the_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", "--checkpoint", str(tiny_run), "--task", str(DATA / "mc.jsonl")]
    assert main([*args, "--device", "cpu", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    r = written["tasks"]["mc"]
    assert r["format"] == "mc" and r["n_items"] == 3 and r["chance"] == 0.5
    assert r["centred"] == pytest.approx((r["acc"] - 0.5) / 0.5)
    assert written["core"] == r["centred"]
    assert not [p for p in tmp_path.iterdir() if p.name != "report.json"]  # no temp file left


def test_cli_suite_matches_the_library_and_plain_eval_is_unchanged(tiny_run, capsys):
    suite = str(DATA / "suite.toml")
    assert main(["eval", "--checkpoint", str(tiny_run), "--suite", suite, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    run = open_run(tiny_run, "cpu")
    lib = run_suite(run.model, run.tokenizer, load_suite(suite), context_length=32)
    assert r["tasks"] == lib["tasks"] and r["core"] == lib["core"]
    assert set(r["tasks"]) == {
        "hellaswag-mini", "arc-mini", "piqa-mini", "copa-mini", "lambada-mini", "mc-mini",
    }  # fmt: skip
    assert r["tasks"]["arc-mini"]["num_fewshot"] == 1
    assert r["tasks"]["arc-mini"]["n_truncated"] > 0  # one shot does not fit 32 tokens
    assert "perplexity" in r["tasks"]["lambada-mini"]
    # without --task/--suite, `gptlab eval` measures loss as before
    assert main(["eval", "--checkpoint", str(tiny_run), "--json", "--max-batches", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte"} <= set(plain) and "tasks" not in plain


# --------------------------------------------------------------------------- scores


class _ByteTokenizer:
    """One id per byte (ids 0-95 for printable ASCII), <|endoftext|> = 96: a tokenizer the
    97-id test model can read, for which a test can count tokens by eye."""

    eot_token = 96

    def encode(self, text: str) -> list[int]:
        return [min(ord(c) - 32, 95) for c in text]


def _mc_task(tmp_path, items, **kw):
    return make_task(str(_write(tmp_path / "t.jsonl", items)), "mc", **kw)


def test_left_truncation_is_counted_per_item(model, tmp_path):
    items = [
        {"context": "ab", "choices": ["c", "d"], "answer": 0},  # 2 + 2 tokens: fits
        {"context": "x" * 14, "choices": ["c", "de"], "answer": 1},  # 14 + 3 - 1 = 16: fits
        {"context": "x" * 15, "choices": ["c", "de"], "answer": 1},  # " de" needs 17: cut
        {"context": "y" * 40, "choices": ["c", "d"], "answer": 0},  # cut
    ]
    r = run_task(model, _ByteTokenizer(), _mc_task(tmp_path, items), context_length=T)
    assert r["n_items"] == 4 and r["n_truncated"] == 2


def test_task_scores_batched_equal_one_at_a_time_and_follow_the_argmax(model, tmp_path):
    rng = random.Random(3)
    letters = "abcdefghij"
    items = []
    for _ in range(9):
        n = rng.choice([2, 3, 4])
        items.append(
            {
                "context": "".join(rng.choice(letters) for _ in range(rng.randint(1, 12))),
                "choices": ["".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(n)],
                "answer": rng.randrange(n),
            }
        )  # fmt: skip
    task = _mc_task(tmp_path, items)
    tok = _ByteTokenizer()
    one = run_task(model, tok, task, context_length=T, batch_size=1)
    many = run_task(model, tok, task, context_length=T, batch_size=7)
    assert one == many
    # the same accuracies written out from single-request scores
    right = right_norm = 0
    for it in task.items:
        lls = []
        for c in it.choices:
            ctx, cont = encode_pair(tok, it.context, " " + c)
            lls.append(_plain_score(model, ctx, cont).logprob)
        right += max(range(len(lls)), key=lls.__getitem__) == it.answer
        per_char = [x / len(c) for x, c in zip(lls, it.choices, strict=True)]  # lm-eval: chars
        right_norm += max(range(len(lls)), key=per_char.__getitem__) == it.answer
    assert one["acc"] == right / 9 and one["acc_norm"] == right_norm / 9


def test_centred_score_and_core_arithmetic(model, tmp_path):
    assert centred(0.25, 0.25) == 0 and centred(1.0, 0.25) == 1
    assert centred(0.5, 0.25) == pytest.approx(1 / 3)
    assert centred(0.0, 0.5) == -1  # worse than guessing is below zero
    items = [
        {"context": "ab", "choices": ["c", "d"], "answer": 0},
        {"context": "ab", "choices": ["c", "d", "e", "f"], "answer": 3},
    ]
    task = _mc_task(tmp_path, items)
    assert chance(task) == pytest.approx((1 / 2 + 1 / 4) / 2)  # mean of 1/len(choices)
    fixed = _mc_task(tmp_path, items, random_baseline=0.1, metric="acc_norm")
    suite = Suite("s", [task, fixed], DEFAULT_SEED)
    fixed.name = "fixed"
    r = run_suite(model, _ByteTokenizer(), suite, context_length=T)
    a, b = r["tasks"]["t"], r["tasks"]["fixed"]
    assert a["centred"] == pytest.approx((a["acc"] - 0.375) / 0.625)
    assert b["chance"] == 0.1 and b["centred"] == pytest.approx((b["acc_norm"] - 0.1) / 0.9)
    assert r["core"] == pytest.approx((a["centred"] + b["centred"]) / 2)


def test_fewshot_examples_are_fixed_other_items_separated_by_blank_lines(tmp_path):
    items = [{"context": f"Q{i}", "choices": [f"A{i}", "B"], "answer": 0} for i in range(12)]
    task = _mc_task(tmp_path, items, num_fewshot=3)
    ctx = fewshot_context(task, 5)
    parts = ctx.split("\n\n")
    assert len(parts) == 4 and parts[-1] == "Q5"
    shots = parts[:3]
    assert all(s.startswith("Q") and s.endswith(f" A{s[1:].split(' ')[0]}") for s in shots)
    assert "Q5 A5" not in shots and len(set(shots)) == 3  # never the item, never twice
    assert fewshot_context(task, 5) == ctx  # the same every time
    assert [fewshot_context(task, i) for i in range(12)] == [
        fewshot_context(task, i) for i in range(12)
    ]
    other_seed = {fewshot_context(task, i, seed=7) for i in range(12)}
    assert other_seed != {fewshot_context(task, i) for i in range(12)}
    assert fewshot_context(_mc_task(tmp_path, items), 5) == "Q5"  # zero-shot


class _SpaceThenZ(torch.nn.Module):
    """A causal 'model' over _ByteTokenizer's ids: after a space it expects "z", after
    anything else a space (logit 4 against 0)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (B, T) -> (B, T, 97)
        nxt = torch.where(x == 0, ord("z") - 32, 0)  # id 0 is the space
        return 4.0 * torch.nn.functional.one_hot(nxt, 97).float() + self.dummy


def test_cloze_is_right_when_greedy_decoding_gives_the_last_word(tmp_path):
    items = [{"text": "a b z"}, {"text": "a b q"}, {"text": "c zz"}]
    task = make_task(str(_write(tmp_path / "l.jsonl", items)), "lambada")
    r = run_task(_SpaceThenZ(), _ByteTokenizer(), task, context_length=T)
    assert r["n_items"] == 3 and r["acc"] == pytest.approx(1 / 3)  # only " z" is greedy
    # log p: " " is 4 above 96 others; a second "z" after "z" is one of the 96 at 0
    top, rest = math.log(math.exp(4) / (math.exp(4) + 96)), math.log(1 / (math.exp(4) + 96))
    want = [2 * top, top + rest, 2 * top + rest]
    assert r["logprob"] == pytest.approx(sum(want) / 3, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(-sum(want) / 3), rel=1e-5)
    assert r["centred"] == r["acc"] and r["chance"] == 0  # guessing a word scores nothing


def test_a_model_overfit_on_a_sentence_picks_it(tmp_path):
    """The hand-checkable item: trained on one sentence, the model must prefer that
    sentence's ending to another, whichever place the right choice takes."""
    from gptlab.data.tokenizer import CharTokenizer

    sentence = "The lighthouse keeper counted the ships that passed before dawn."
    wrong = "a green ledger full of numbers."
    tok = CharTokenizer.from_text(sentence + wrong)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.n_vocab, context_length=80, emb_dim=32, n_heads=4, n_layers=2,
        drop_rate=0.0,
    )  # fmt: skip
    net = GPTModel(cfg)
    ids = torch.tensor([tok.encode(sentence)])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(40):
        logits = net(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    ctx = "The lighthouse keeper counted"
    items = [
        {"context": ctx, "choices": ["the ships that passed before dawn.", wrong], "answer": 0},
        {"context": ctx, "choices": [wrong, "the ships that passed before dawn."], "answer": 1},
    ]
    r = run_task(net, tok, _mc_task(tmp_path, items), context_length=80)
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0 and r["centred"] == 1.0
