"""`gptlab prepare`: streamed, parallel, resumable tokenization into shards, checked against a
direct in-memory tokenization of the same documents and pieces; the split of one short text."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import make_corpus_text

from gptlab.cli.main import main
from gptlab.data import prepare as P
from gptlab.data import sources as S
from gptlab.data.corpus import TokenWindowLoader, load_corpus
from gptlab.data.shards import ShardedTokens, open_split, read_manifest
from gptlab.data.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer
from gptlab.errors import GptlabError

WORDS = "the quick brown fox jumps over lazy dogs while café naïve 東京 🙂 1234 don't".split()


def _text(rng: random.Random, n_words: int) -> str:
    """Text with the awkward bits a piece cut could break: whitespace runs, tabs, blank lines,
    non-ASCII words, digits and contractions."""
    out = []
    for _ in range(n_words):
        out.append(rng.choice(WORDS))
        out.append(rng.choice([" ", " ", " ", "  ", "\n", "\n\n", "\t", ", ", ". ", " \n "]))
    return "".join(out)


@pytest.fixture
def corpus_dir(tmp_path):
    """Five text files (two longer than several read pieces) and a jsonl file of documents."""
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    docs = []
    for i, n in enumerate([400, 3000, 50, 2500, 10]):
        text = _text(rng, n)
        (d / f"f{i}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    lines = []
    for i in range(30):
        text = f"record {i}: " + _text(rng, rng.randint(5, 80))
        lines.append(json.dumps({"id": i, "text": text}))
        docs.append(text)
    (d / "z.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d, docs  # docs in the order prepare reads them (sorted paths)


@pytest.fixture
def small_pieces(monkeypatch):
    # tiny read pieces and tasks: many cuts inside documents and many tasks to interrupt
    monkeypatch.setattr(S, "CHUNK_BYTES", 997)
    monkeypatch.setattr(P, "BATCH_BYTES", 2500)


def _split_docs(docs: list[str], manifest: dict) -> dict[str, list[str]]:
    """The texts each split should hold, computed directly: documents cut by `cut_pieces` at
    the manifest's piece size, pieces numbered in order and assigned by `piece_split`;
    consecutive pieces of a document in one split run on, anything else is a new text."""
    pieces = [
        (d, text)
        for d, doc in enumerate(docs)
        for text in S.cut_pieces(doc, manifest["split"]["piece_bytes"])
    ]
    val = P.piece_split(manifest["seed"], np.arange(len(pieces)), manifest["val_ratio"])
    out: dict[str, list[str]] = {"train": [], "val": []}
    last: dict[str, tuple[int, int] | None] = {"train": None, "val": None}
    for n, ((d, text), v) in enumerate(zip(pieces, val, strict=True)):
        split = "val" if v else "train"
        if last[split] == (d, n - 1):
            out[split][-1] += text
        else:
            out[split].append(text)
        last[split] = (d, n)
    return out


def _all_tokens(directory, split) -> np.ndarray:
    return np.asarray(open_split(directory, split))


def test_shards_equal_direct_tokenization(tmp_path, corpus_dir, small_pieces):
    d, docs = corpus_dir
    out = tmp_path / "prep"
    m = P.prepare([str(d)], out, "gpt2", val_ratio=0.3, seed=7, workers=2, shard_tokens=1000)
    tok = GPT2Tokenizer()
    expected = _split_docs(docs, m)
    assert expected["train"] and expected["val"]
    # the long files were cut into pieces (smaller than one read chunk here), the rest whole
    assert m["split"]["piece_bytes"] > 997 and m["split"]["pieces"] > len(docs) + 20
    assert sum(m["splits"][s]["pieces"] for s in P.SPLITS) == m["split"]["pieces"]
    for split, split_docs in expected.items():
        ref = tok.encode(ENDOFTEXT.join(split_docs))
        got = _all_tokens(out, split)
        assert got.dtype == np.uint16
        assert got.tolist() == ref  # the exact tokens, not only their number
        s = m["splits"][split]
        assert s["tokens"] == len(ref)
        assert s["documents"] == len(split_docs)
        assert s["bytes"] == sum(len(x.encode("utf-8")) for x in split_docs)
        assert all(sh["tokens"] <= 1000 for sh in s["shards"])
        # documents are separated by <|endoftext|>: n - 1 separators, each piece one document
        assert int((got == tok.eot_token).sum()) == len(split_docs) - 1
        pieces = np.split(got, np.flatnonzero(got == tok.eot_token))
        decoded = [tok.decode(p[p != tok.eot_token].tolist()) for p in pieces]
        assert decoded == split_docs
    assert P.verify(out) == []
    assert not (out / P.PROGRESS).exists()


def test_no_document_in_both_splits(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " + "word " * (i % 7)}) for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "prep"
    m = P.prepare([str(tmp_path / "d.jsonl")], out, "gpt2", val_ratio=0.25, seed=3, workers=1)
    tok = GPT2Tokenizer()
    seen = {}
    for split in ("train", "val"):
        text = tok.decode(_all_tokens(out, split).tolist())
        seen[split] = set(text.split(ENDOFTEXT))
        assert len(seen[split]) == m["splits"][split]["documents"]
    assert not seen["train"] & seen["val"]
    assert len(seen["train"]) + len(seen["val"]) == 200
    assert 40 <= len(seen["val"]) <= 60  # about a quarter, decided per document
    assert m["split"]["pieces"] == 200  # short documents of a many-document corpus stay whole


@pytest.mark.parametrize("stop_after,checkpoint_seconds", [(1, 0.0), (3, 1e9), (6, 0.0), (9, 1e9)])
def test_interrupted_prepare_resumes_byte_identical(
    tmp_path, corpus_dir, small_pieces, stop_after, checkpoint_seconds
):
    d, _ = corpus_dir
    ref = tmp_path / "ref"
    P.prepare([str(d)], ref, "gpt2", val_ratio=0.3, workers=2, shard_tokens=700)
    out = tmp_path / "out"
    # stops abruptly after `stop_after` tasks; with checkpoint_seconds=1e9 only finished shards
    # checkpoint, so data written after the last checkpoint must be cut away on resume
    partial = P.prepare(
        [str(d)],
        out,
        "gpt2",
        val_ratio=0.3,
        workers=2,
        shard_tokens=700,
        checkpoint_seconds=checkpoint_seconds,
        _stop_after_tasks=stop_after,
    )
    assert partial == {} and (out / P.PROGRESS).exists() and not (out / "manifest.json").exists()
    events = []
    P.prepare(
        [str(d)],
        out,
        "gpt2",
        val_ratio=0.3,
        workers=1,  # another worker count must not change the result
        shard_tokens=700,
        on_event=events.append,
    )
    assert events[0]["event"] == "start" and events[0]["resumed"]
    ref_files = sorted(p.name for p in ref.glob("*.bin"))
    assert ref_files == sorted(p.name for p in out.glob("*.bin"))
    for name in ref_files:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert read_manifest(ref)["splits"] == read_manifest(out)["splits"]


def test_finished_preparation_is_kept_and_other_settings_refused(tmp_path, corpus_dir):
    d, _ = corpus_dir
    out = tmp_path / "prep"
    m = P.prepare([str(d)], out, "gpt2", workers=1)
    events = []
    assert P.prepare([str(d)], out, "gpt2", workers=1, on_event=events.append) == m
    assert events[0]["event"] == "finished_already"
    with pytest.raises(GptlabError, match="seed differs"):
        P.prepare([str(d)], out, "gpt2", workers=1, seed=99)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("unrelated")
    with pytest.raises(GptlabError, match="not empty"):
        P.prepare([str(d)], tmp_path / "other", "gpt2", workers=1)


def test_streaming_loader_yields_in_memory_windows(tmp_path, corpus_dir):
    d, docs = corpus_dir
    out = tmp_path / "prep"
    m = P.prepare([str(d)], out, "gpt2", val_ratio=0.2, seed=1, workers=2, shard_tokens=333)
    corpus = load_corpus(str(out), "ignored", 0.5)
    assert isinstance(corpus.train, ShardedTokens) and len(corpus.train.shards) > 5
    assert all(isinstance(s, np.memmap) for s in corpus.train.shards)
    ref = np.array(GPT2Tokenizer().encode(ENDOFTEXT.join(_split_docs(docs, m)["train"])))
    ref = ref.astype(np.uint16)
    assert len(corpus.train) == len(ref)
    a = TokenWindowLoader(corpus.train, 4, 32, stride=20, shuffle=True, seed=5)
    b = TokenWindowLoader(ref, 4, 32, stride=20, shuffle=True, seed=5)
    assert len(a) == len(b) > 10
    for epoch in (0, 1):
        for i in range(len(a)):
            xa, ya = a.batch(epoch, i)
            xb, yb = b.batch(epoch, i)
            assert xa.equal(xb) and ya.equal(yb)


def test_sharded_tokens_index_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, n).astype(np.uint16) for n in (5, 17, 1, 40)]
    whole = np.concatenate(parts)
    st = ShardedTokens(parts)
    idx = rng.integers(0, len(whole), (6, 9))
    assert np.array_equal(st[idx], whole[idx])
    assert st[len(whole) - 1] == whole[-1] and st[-3] == whole[-3] and st[7] == whole[7]
    assert np.array_equal(np.asarray(st[3:50]), whole[3:50])
    assert np.array_equal(np.asarray(st[::7]), whole[::7])
    with pytest.raises(IndexError):
        st[np.array([len(whole)])]


def test_uint32_when_ids_exceed_uint16(tmp_path):
    from tokenizers import Tokenizer

    from gptlab.data.bpe import train_bpe

    base = train_bpe(["a small text to learn a few merges from"] * 5, 300)
    hf = Tokenizer.from_str(base.to_json())
    hf.add_tokens([f"<x{i}>" for i in range(70000)])  # ids up to ~70,300
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(hf.to_str())
    tok = BPETokenizer.from_file(tmp_path / "tok")
    assert tok.n_vocab > 65536
    texts = ["hello <x69999> world", "more <x65600> text <x3>"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    out = tmp_path / "prep"
    m = P.prepare(
        [str(tmp_path / "0.txt"), str(tmp_path / "1.txt")],
        out,
        str(tmp_path / "tok"),
        val_ratio=0.0,
        workers=1,
    )
    assert m["dtype"] == "uint32"
    got = _all_tokens(out, "train")
    assert got.dtype == np.uint32
    ref = tok.encode(ENDOFTEXT.join(texts))
    assert got.tolist() == ref and max(ref) > 65535  # ids above uint16 survive intact


def test_char_tokenizer_and_doc_separator(tmp_path):
    (tmp_path / "a.txt").write_text("first story<|endoftext|>second ünïcode<|endoftext|>third")
    out = tmp_path / "prep"
    m = P.prepare(
        [str(tmp_path / "a.txt")],
        out,
        "char",
        val_ratio=0.0,
        workers=2,
        doc_separator=ENDOFTEXT,
    )
    assert m["splits"]["train"]["documents"] == 3
    tok = CharTokenizer(m["tokenizer"]["chars"])
    assert set(tok.chars) == set("first storysecond ünïcodethird")
    ref = tok.encode("first story<|endoftext|>second ünïcode<|endoftext|>third")
    assert _all_tokens(out, "train").tolist() == ref


def _jsonl(tmp_path, lines: list[str]):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_malformed_jsonl_line_is_a_clear_error(tmp_path, capsys):
    p = _jsonl(tmp_path, ['{"text": "good one"}', '{"text": "good two"}', '{"text": "broken'])
    with pytest.raises(GptlabError, match=r"data\.jsonl:3: malformed JSON") as e:
        P.prepare([str(p)], tmp_path / "out", "gpt2", workers=1)
    assert "\n" not in str(e.value) and "--skip-bad" in str(e.value)
    code = main(["prepare", str(p), "--out", str(tmp_path / "out2"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "data.jsonl:3: malformed JSON" in err and "Traceback" not in err


def test_missing_field_is_a_clear_error(tmp_path):
    p = _jsonl(tmp_path, ['{"text": "good"}', "", '{"body": "no text field"}'])
    with pytest.raises(GptlabError, match=r"data\.jsonl:3: missing field 'text'"):
        P.prepare([str(p)], tmp_path / "out", "gpt2", workers=1)
    with pytest.raises(GptlabError, match=r"data\.jsonl:1: missing field 'body'"):
        P.prepare([str(p)], tmp_path / "out2", "gpt2", workers=1, text_field="body")


def test_skip_bad_skips_and_counts(tmp_path):
    p = _jsonl(
        tmp_path,
        [
            '{"text": "alpha"}',
            "not json at all",
            '{"body": "missing"}',
            '{"text": 42}',
            '["a list"]',
            '{"text": "omega"}',
        ],
    )
    m = P.prepare([str(p)], tmp_path / "out", "gpt2", workers=2, skip_bad=True, val_ratio=0.0)
    assert m["skipped"]["count"] == 4
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in m["skipped"]["examples"]] == list("2345")
    assert m["splits"]["train"]["documents"] == 2
    assert _all_tokens(tmp_path / "out", "train").tolist() == GPT2Tokenizer().encode(
        f"alpha{ENDOFTEXT}omega"
    )


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} says " + "hi " * i for i in range(25)]
    table = pa.table({"content": texts, "n": list(range(25))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=10)  # 3 row groups
    out = tmp_path / "prep"
    m = P.prepare(
        [str(tmp_path / "d.parquet")], out, "gpt2", text_field="content", val_ratio=0.2, workers=2
    )
    tok = GPT2Tokenizer()
    for split, docs in _split_docs(texts, m).items():
        assert _all_tokens(out, split).tolist() == tok.encode(ENDOFTEXT.join(docs))
        assert m["splits"][split]["documents"] == len(docs)
    with pytest.raises(GptlabError, match="no column 'text'"):
        P.prepare([str(tmp_path / "d.parquet")], tmp_path / "p2", "gpt2", workers=1)


def test_hf_dataset_problem_is_one_line(tmp_path):
    # without `datasets` installed, or offline, or with an unknown name: one clear line
    with pytest.raises(GptlabError) as e:
        P.prepare(["hf:gptlab-no-such/dataset-xyz"], tmp_path / "out", "gpt2", workers=1)
    assert "\n" not in str(e.value) and "dataset" in str(e.value)


def test_bad_inputs(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        P.prepare([str(tmp_path / "nope.txt")], tmp_path / "o", "gpt2")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01 binary \xff")  # named by itself: read as text
    with pytest.raises(GptlabError, match="x.bin: byte 10: is not UTF-8"):
        P.prepare([str(tmp_path / "x.bin")], tmp_path / "o", "gpt2", workers=1)
    (tmp_path / "bad.txt").write_bytes(b"ok text \xff\xfe more")
    with pytest.raises(GptlabError, match="bad.txt: byte 8: is not UTF-8"):
        P.prepare([str(tmp_path / "bad.txt")], tmp_path / "o2", "gpt2", workers=1)


# --------------------------------------------------------------------------- one short text


@pytest.fixture
def story(tmp_path):
    """One ~20 KB text of paragraphs: the walk-through's kind of first corpus."""
    path = tmp_path / "story.txt"
    path.write_text(make_corpus_text(70), encoding="utf-8")
    assert 18_000 < path.stat().st_size < 22_000
    return path


def test_one_text_file_gets_both_splits(tmp_path, story):
    out = tmp_path / "prep"
    m = P.prepare([str(story)], out, "gpt2", workers=1)  # the defaults: val_ratio 0.1
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["tokens"] and val["tokens"]
    assert 0.05 < val["bytes"] / (train["bytes"] + val["bytes"]) < 0.15  # about a tenth
    assert train["bytes"] + val["bytes"] == story.stat().st_size  # nothing lost or doubled
    split = m["split"]
    assert split["unit"] == "piece" and split["piece_bytes"] == P.AUTO_MIN_PIECE_BYTES
    assert split["pieces"] == train["pieces"] + val["pieces"] > 30
    assert "seed" in split["rule"] and "val_ratio" in split["rule"]
    assert "paragraph break" in split["cut"]
    tok = GPT2Tokenizer()
    for name, texts in _split_docs([story.read_text(encoding="utf-8")], m).items():
        assert _all_tokens(out, name).tolist() == tok.encode(ENDOFTEXT.join(texts))
    # the seed changes which pieces, not whether validation gets any
    for seed in range(5):
        m = P.prepare([str(story)], tmp_path / f"s{seed}", "gpt2", workers=1, seed=seed)
        assert m["splits"]["val"]["tokens"] > 0


def test_piece_split_spreads_evenly():
    for seed in range(300):  # at 0.1, any 13 consecutive pieces hold a validation piece
        val = P.piece_split(seed, np.arange(1000, 1013), 0.1)
        assert val.any() and not val.all()
    val = P.piece_split(1337, np.arange(100_000), 0.1)
    assert abs(val.mean() - 0.1) < 0.001
    assert not P.piece_split(1337, np.arange(1000), 0.0).any()
    again = P.piece_split(1337, np.arange(5000)[::-1], 0.1)[::-1]  # order does not matter
    assert np.array_equal(again, val[:5000])


def test_interrupted_prepare_of_one_file_resumes_byte_identical(tmp_path, story, small_pieces):
    ref = tmp_path / "ref"
    P.prepare([str(story)], ref, "gpt2", workers=2, shard_tokens=300)
    out = tmp_path / "out"
    assert (
        P.prepare(
            [str(story)],
            out,
            "gpt2",
            workers=2,
            shard_tokens=300,
            _stop_after_tasks=3,
            checkpoint_seconds=1e9,
        )
        == {}
    )
    P.prepare([str(story)], out, "gpt2", workers=1, shard_tokens=300)
    names = sorted(p.name for p in ref.glob("*.bin"))
    assert names == sorted(p.name for p in out.glob("*.bin")) and len(names) > 4
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert read_manifest(ref)["splits"] == read_manifest(out)["splits"]


def test_prepare_one_file_then_train(tmp_path, story, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", str(story), "--out", str(data), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and f"gptlab train --data {data}" in out
    args = ["train", "--data", str(data), "--preset", "tiny", "--max-steps", "5", "--out", str(run)]
    assert main([*args, "--device", "cpu", "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and all(np.isfinite(r["val_loss"]) for r in evals)
