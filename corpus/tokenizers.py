"""
The two tokenizers, both tiktoken.Encoding with GPT-2's pre-tokenizer split:

- "byte": the 256 bytes, then <|endoftext|> (257 ids, eot = 256);
- "gpt2": GPT-2's BPE (50257 ids, eot = 50256), read offline out of the `openai-whisper` sdist
  (corpus/download.py fetches it once, pinned by sha256).

A literal "<|endoftext|>" in a text is text: only a document's end becomes the eot id.
"""

import base64
import functools
import tarfile

import numpy as np
import tiktoken

from corpus.download import WHISPER, DataError, fetch

TOKENIZERS = ("byte", "gpt2")
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split. Every character is a letter, a number, whitespace or "other", so
# the pieces cover the whole text and the byte tokenizer drops nothing.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


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
