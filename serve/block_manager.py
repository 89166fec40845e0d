"""
The serving engine's memory: one pool of fixed-size pages, allocated once from a budget,
shared by every kind of cache a request holds, and a prefix cache over it.

- a page holds page_size columns of one layer's keys and values. The pool is counted by the
  project's one bytes rule (serve.memory.held_bytes): a budget of B bytes is as many pages as fit;
- a Group is one kind of cache (dec's layers; bdd's decoder and its encoder layers; encdec's
  decoder self and cross K/V); a Block of a group is page_size columns of a request's cache in
  every layer of the group, a page per layer. All groups share the pool, so bdd's encoder blocks
  use whatever the decoder blocks leave free;
- prefix caching: a full block whose K/V depend only on the tokens up to its end is registered
  under (group, chained hash of those tokens) and shared by the requests whose tokens start the
  same. When nobody holds it any more it stays cached in LRU order until the pool needs its
  pages, the one freed longest ago first. bdd's encoder blocks are freed right after their
  prefill (serve/engine.py), before the decoder blocks of the same turn: under pressure they go
  first, while the blocks of running requests are never taken.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from serve.memory import held_bytes

PAGE_SIZE = 16  # columns per page, as in vLLM


@dataclass(frozen=True)
class Group:
    name: str        # "kv" (dec), "dec" and "enc" (bdd), "self" and "cross" (encdec)
    layers: int      # pages per block: one per layer that holds K/V of this kind


class Block:
    """page_size columns of a request's cache in one group: a page id per layer. refs: the
    requests that hold it; key: its prefix-cache key once registered (None: private)."""

    def __init__(self, group, pages):
        self.group, self.pages = group, pages
        self.refs, self.key = 1, None


def chain_hashes(tokens, page_size, known=()):
    """The chained hash of each full page of tokens: digest i covers tokens[:(i + 1) * page_size]
    (so it names a page's position too). known: the digests of a prefix, already computed."""
    digests = list(known)
    for i in range(len(digests), len(tokens) // page_size):
        page = np.asarray(tokens[i * page_size:(i + 1) * page_size], dtype=np.int64).tobytes()
        digests.append(hashlib.sha256((digests[-1] if digests else b"") + page).digest())
    return digests


class Pool:
    """K and V of num_pages pages, each (page_size, n_kv_head, head_size) of one layer, stored
    flat by column (row p * page_size + c: column c of page p). Zeroed: a masked column is read
    too, and a NaN there would leak through attention's zero weights."""

    def __init__(self, num_pages, page_size, n_kv_head, head_size, dtype, device):
        self.num_pages, self.page_size = num_pages, page_size
        self.k = torch.zeros(num_pages * page_size, n_kv_head, head_size, dtype=dtype,
                             device=device)
        self.v = torch.zeros_like(self.k)

    def tensors(self):
        return [self.k, self.v]

    @classmethod
    def for_budget(cls, budget_bytes, *shape):
        """The largest pool whose held bytes fit in budget_bytes (a page's bytes measured on a
        one-page pool); ValueError if not one page fits. shape: Pool's other arguments."""
        page_bytes = sum(held_bytes(cls(1, *shape).tensors()).values())
        if budget_bytes < page_bytes:
            raise ValueError(f"a budget of {budget_bytes / 1e6:.3g} MB holds no page of "
                             f"{page_bytes:,} bytes")
        return cls(int(budget_bytes // page_bytes), *shape)


class BlockManager:
    """Which pages are free, which blocks are cached, and which go first."""

    def __init__(self, num_pages):
        self.num_pages = num_pages
        self.free = list(range(num_pages))  # page ids of no block
        self.cached = {}                    # key -> registered Block (held, or in the LRU)
        self.lru = OrderedDict()            # key -> registered Block nobody holds, oldest first
        self.lru_pages = self.evictions = self.peak_used = 0

    @property
    def used(self):
        """Pages that requests hold (neither free nor in a cached block nobody holds)."""
        return self.num_pages - len(self.free) - self.lru_pages

    def available(self):
        """Pages an allocation can take: the free ones and those of the LRU's blocks."""
        return len(self.free) + self.lru_pages

    def hits(self, groups, digests):
        """How many leading digests have a registered block in every group."""
        n = 0
        while n < len(digests) and all((g.name, digests[n]) in self.cached for g in groups):
            n += 1
        return n

    def share(self, group, digest):
        """Hold a registered block (out of the LRU if nobody held it)."""
        block = self.cached[(group.name, digest)]
        if block.refs == 0:
            del self.lru[block.key]
            self.lru_pages -= len(block.pages)
        block.refs += 1
        return block

    def allocate(self, group):
        """A new private block, evicting cached blocks while too few pages are free."""
        while len(self.free) < group.layers:
            key, block = self.lru.popitem(last=False)
            del self.cached[key]
            self.lru_pages -= len(block.pages)
            self.free.extend(block.pages)
            self.evictions += 1
        pages = [self.free.pop() for _ in range(group.layers)]
        self.peak_used = max(self.peak_used, self.used)
        return Block(group, pages)

    def register(self, block, digest):
        """Make a full block a prefix-cache entry, unless an equal one is registered (two
        requests computed the same prefix at once: the first stays, this one stays private)."""
        key = (block.group.name, digest)
        if block.key is None and key not in self.cached:
            block.key, self.cached[key] = key, block

    def release(self, blocks):
        """Let go of blocks: one nobody holds goes to the LRU if registered, its pages to the
        free list if not. Last block first, so that a prefix loses its end before its start."""
        for block in reversed(blocks):
            block.refs -= 1
            if block.refs == 0 and block.key is None:
                self.free.extend(block.pages)
            elif block.refs == 0:
                self.lru[block.key] = block
                self.lru_pages += len(block.pages)
