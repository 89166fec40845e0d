"""
model.Cache's interface over pages: what the serving engine hands the model for one
forward of a batch of requests, each with its own block table and length.

next(n) gives each row the positions of its new columns and the mask of their queries over every
key the row holds after the append; each layer's update(k, v) writes the row's new K/V into its
pages and returns its keys and values gathered from them; for encdec, source() and `cross` do the
same for the source's K/V. Rows with different numbers of new columns are left-padded to one
width (so that every row's last column is real: the model reads the next-token logits there), and
expect() says how many of the next next(n)'s columns are real in each row. Padding is neither
written nor attended to; a padding query attends to nothing (zeros). A row's keys are its columns
from 0 on (a column's index is its position), rows shorter than the longest masked at the end.
On the CPU the gather is a copy; the same code runs on CUDA.
"""

import torch


class PagedKV:
    """One layer of a PagedCache: update(k, v) appends the batch's new K/V (B, nh_kv, n, hs)."""

    def __init__(self, cache, layer):
        self.cache, self.layer = cache, layer

    def update(self, k, v):
        self.cache.write(self.layer, k, v)
        return self.cache.read(self.layer)


class PagedCache:
    """The caches of a batch of rows in one group of n_layers layers: tables, per row, a block
    table (Blocks, each a page per layer), lengths the columns each row holds. source: for encdec,
    the PagedCache of the rows' cross K/V, which `cross` reads and writes."""

    def __init__(self, pool, n_layers, tables, lengths, source=None):
        self.pool, self.size, self.device = pool, pool.page_size, pool.k.device
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        width = max(1, max(len(t) for t in tables))
        pages = [[b.pages for b in t] + [[0] * n_layers] * (width - len(t)) for t in tables]
        self.pages = torch.tensor(pages, dtype=torch.long).permute(2, 0, 1)  # (layers, B, width)
        self.layers = [PagedKV(self, i) for i in range(n_layers)]
        self.counts, self.source_cache = None, source
        self.cross_mask = None if source is None else source.held_mask()

    def expect(self, counts):
        """The next next(n) has counts[b] real columns in row b (its last ones)."""
        self.counts = torch.tensor(counts, dtype=torch.long)

    def next(self, n):
        """Claim n new columns per row: their positions (B, n) (a padding column gets 0), and
        the mask (B, n, L) of their queries over each row's L columns after the append: causal,
        over real columns only."""
        counts = self.counts if self.counts is not None else torch.full_like(self.lengths, n)
        self.counts = None
        pad = (n - counts)[:, None]
        column = torch.arange(n)
        self.real = column >= pad                                   # (B, n)
        positions = self.lengths[:, None] + column - pad            # (B, n)
        self.new = positions[self.real]                             # written columns, row-major
        self.rows = torch.arange(len(counts))[:, None].expand(-1, n)[self.real]
        self.lengths = self.lengths + counts
        keys = torch.arange(int(self.lengths.max()))
        mask = self.real[:, :, None] & (keys <= positions[:, :, None])
        return positions.clamp(min=0).to(self.device), mask.to(self.device)

    def write(self, layer, k, v):
        """Write the real columns of k, v (B, nh_kv, n, hs) into the rows' pages."""
        at = (self.pages[layer, self.rows, self.new // self.size] * self.size
              + self.new % self.size).to(self.device)
        real = self.real.to(self.device)
        self.pool.k.index_copy_(0, at, k.transpose(1, 2)[real])
        self.pool.v.index_copy_(0, at, v.transpose(1, 2)[real])

    def read(self, layer):
        """Every key and value of the rows, (B, nh_kv, L, hs): their pages gathered whole (a
        copy of 16-column pieces), cut at the longest row."""
        L = int(self.lengths.max())
        pages = self.pages[layer, :, :-(-L // self.size)].to(self.device)  # (B, pages)
        B, n = pages.shape

        def gather(pool):  # pages as rows of a 2-D view: index_select copies them whole
            pieces = pool.view(self.pool.num_pages, -1).index_select(0, pages.reshape(-1))
            return pieces.view(B, n * self.size, *pool.shape[1:])[:, :L].transpose(1, 2)
        return gather(self.pool.k), gather(self.pool.v)

    # encdec: the source and its cross K/V

    def source(self, n):
        """The encoder's positions (B, n) of a left-padded source of n columns and its mask
        (B, n, n): every real column sees every real column (bidirectional). The rows' cross
        K/V go to the source cache's pages (n real columns at most per row)."""
        src = self.source_cache
        positions, _ = src.next(n)
        real = src.real.to(self.device)
        self.cross_mask = src.held_mask()
        return positions, real[:, :, None] & real[:, None, :]

    def held_mask(self):
        """(B, 1, L): the columns each row holds, of the L gathered (the cross-attention mask)."""
        return (torch.arange(int(self.lengths.max())) < self.lengths[:, None])[:, None].to(
            self.device)

    @property
    def cross(self):
        """Each decoder layer's (k, v) of its rows' sources, gathered from their pages."""
        src = self.source_cache
        return None if src is None else [src.read(i) for i in range(len(src.layers))]

    @cross.setter
    def cross(self, kv):
        """model.remember: each decoder layer's (k, v) (B, nh_kv, n, hs) of the source."""
        for i, (k, v) in enumerate(kv):
            self.source_cache.write(i, k, v)
