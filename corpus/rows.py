"""
A task's rows on disk: a prepared dataset of fixed-length rows whose loss is on some targets
only, such as lab/probe.py's associative recall. {split}.bin holds the tokens, {split}.loss a byte
per token (1: a target that carries loss), meta.json a "rows" entry; train.py reads such a
folder as --data as it is (nothing to prepare), and pack.Batches draws whole rows from it
(pack.row_batch).
"""

import json
from pathlib import Path

import numpy as np

import cli
import files
from corpus.download import DataError
from corpus.tokenizers import get_tokenizer, token_dtype

ROWS_FORMAT = 1


def is_rows(data):
    """Whether --data names a folder of task rows (write_rows), used as it is."""
    try:
        meta = json.loads((Path(data) / "meta.json").read_text())
    except (TypeError, OSError, ValueError):
        return False
    return isinstance(meta, dict) and "rows" in meta


def write_rows(folder, splits, tokenizer, name, about):
    """Write a task's rows into folder: {split}.bin (the tokens) and {split}.loss (a byte per
    token, 1 where the token is a target that carries loss), each written whole, then meta.json.
    splits: {"train": (tokens, loss), "val": (tokens, loss)}, arrays (rows, L) of one L; about:
    what the rows hold (kept in meta.json)."""
    enc, folder = get_tokenizer(tokenizer), Path(folder)
    (L,) = {tokens.shape[1] for tokens, _ in splits.values()}
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(enc.n_vocab)
    for split, (tokens, loss) in splits.items():
        assert tokens.shape == loss.shape and tokens.max() < enc.n_vocab
        for suffix, array in (("bin", tokens.astype(dtype)), ("loss", loss.astype(np.uint8))):
            with files.written_whole(folder / f"{split}.{suffix}") as tmp:
                array.tofile(tmp)
    meta = {"rows": {"format": ROWS_FORMAT, "length": L}, "name": name, "tokenizer": tokenizer,
            "n_vocab": enc.n_vocab, "eot": enc.eot_token, "dtype": dtype, "turns": None,
            "tokens": {split: int(tokens.size) for split, (tokens, _) in splits.items()},
            "about": about}
    with files.written_whole(folder / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))


# What pack.py reads of a task's meta.json, checked when it is loaded.
ROWS_META = {"rows": {"format": int, "length": int}, "tokenizer": str, "n_vocab": int, "eot": int,
             "dtype": str, "tokens": {"train": int, "val": int}}


def load_rows(folder, tokenizer):
    """meta of a folder of task rows (is_rows), checked by shape, with "dir"; DataError if it is
    of another format, for another tokenizer, or cut short."""
    meta = files.read_json(Path(folder) / "meta.json", ROWS_META, "write the rows again "
                           "(python -m lab.probe --mqar)")
    cli.refuse([(meta["rows"]["format"] != ROWS_FORMAT, f"{folder} holds task rows of format "
                 f"{meta['rows']['format']}, this nanoBDD reads format {ROWS_FORMAT}; write them "
                 f"again (python -m lab.probe --mqar)"),
                (meta["tokenizer"] != tokenizer, f"--data {folder} holds {meta['tokenizer']} "
                 f"tokens; use --tokenizer {meta['tokenizer']}")], DataError)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, n in meta["tokens"].items():
        cli.refuse([(split_sizes(folder, split) != {"bin": n * itemsize, "loss": n},
                     f"{folder}: its {split} split is not the {n:,} tokens its meta.json says "
                     f"(cut short?); write it again (python -m lab.probe --mqar)")], DataError)
    return {**meta, "dir": str(folder)}


def split_sizes(folder, split):
    """{suffix: bytes} of a split's token and loss files, None if one is missing."""
    try:
        return {suffix: (Path(folder) / f"{split}.{suffix}").stat().st_size
                for suffix in ("bin", "loss")}
    except OSError:
        return None
