"""
Continuous batching: which requests each step of the serving engine runs, and the
blocks each holds. A request waits until its prefill is admitted: when the pool has the pages it
writes (after sharing its prefix hits), a block to spare for each running request, and the
step's token budget room. Prefills go first (nano-vllm); a step with nothing to admit decodes a
token for every running request. When a decode step cannot get a page, the request admitted last
(itself, if alone) is preempted: its blocks released (registered ones stay cached, so its
recompute is likely a hit), it goes back to the front of the queue, to be prefilled again over
its prompt and the tokens written so far, with its own block boundary. An arch's rules
(serve/engine.py) say what it holds: its groups, the columns a prefill leaves in each, the
columns whose full blocks are prefix blocks, the groups released after the prefill (bdd's
encoder) and the group a decode step appends to.
"""

from collections import deque
from dataclasses import dataclass, field

from serve.block_manager import chain_hashes


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0: greedy
    top_k: int = None
    stop_tokens: tuple = ()      # a request ends with the first one it writes
    seed: int = 0                # its own generator: its samples do not depend on its batch


@dataclass(eq=False)
class Request:
    id: int
    prompt: list                 # token ids
    params: SamplingParams
    arrival: float
    output: list = field(default_factory=list)
    tables: dict = field(default_factory=dict)    # group name -> [Block], while it holds pages
    lengths: dict = field(default_factory=dict)   # group name -> columns written
    digests: list = field(default_factory=list)   # chained hashes of its full pages of tokens
    generator: object = None
    cached_tokens: int = 0       # prompt tokens its first prefill took from the prefix cache
    preemptions: int = 0
    first_token_at: float = None
    finished_at: float = None

    @property
    def tokens(self):
        return self.prompt + self.output

    @property
    def boundary(self):
        """bdd's block boundary and encdec's decoder start: the prompt's last token."""
        return len(self.prompt) - 1

    @property
    def done(self):  # asked once it has written a token
        p = self.params
        return len(self.output) == p.max_new_tokens or self.output[-1] in p.stop_tokens


class Scheduler:
    """The waiting queue and the running requests over a BlockManager."""

    def __init__(self, manager, rules, page_size, max_batch_tokens, max_seqs):
        self.manager, self.rules, self.size = manager, rules, page_size
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.waiting, self.running = deque(), []
        self.blocked = False  # the last step left a request waiting for want of pages
        self.preemptions = self.prompt_tokens = self.hit_tokens = 0

    def blocks(self, columns):
        return -(-columns // self.size)

    def pages_at_most(self, req):
        """The most pages a request can hold at once: a recompute just before its last token."""
        P = len(req.prompt)
        return sum(self.rules.groups[g].layers * self.blocks(n) for g, n in
                   self.rules.columns(P, P + req.params.max_new_tokens - 1).items())

    def schedule(self):
        """(the requests of the next step, whether it is a prefill)."""
        batch, width, self.blocked = [], 0, False
        while self.waiting and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            hits = self.hit_blocks(req)
            new = len(req.tokens) - hits * self.size
            if (len(batch) + 1) * max(width, new) > self.max_batch_tokens and batch:
                break
            if not self.admit(req, hits):
                self.blocked = True
                break
            self.waiting.popleft()
            self.running.append(req)
            batch.append(req)
            width = max(width, new)
        if batch:
            return batch, True
        self.make_room()
        return list(self.running), False

    def hit_blocks(self, req):
        """Leading full blocks of req's tokens cached in every prefix group (0: none is), at most
        those before its last token (a prefill computes at least one column)."""
        req.digests = chain_hashes(req.tokens, self.size, req.digests)
        prefix = self.rules.prefix(req)
        if not prefix:
            return 0
        limit = min([*prefix.values(), len(req.tokens) - 1]) // self.size
        groups = [self.rules.groups[g] for g in prefix]
        return self.manager.hits(groups, req.digests[:limit])

    def admit(self, req, hits):
        """Give req the blocks its prefill writes, sharing its `hits` first prefix blocks, if the
        pool has the pages and a block to spare per running request; False (none taken) if not."""
        size, groups = self.size, self.rules.groups
        prefix, columns = self.rules.prefix(req), self.rules.columns(len(req.prompt),
                                                                     len(req.tokens))
        shared = [self.manager.cached[(g, d)] for g in prefix for d in req.digests[:hits]]
        need = sum(len(b.pages) for b in shared if b.refs == 0) + sum(
            groups[g].layers * (self.blocks(n) - hits * (g in prefix)) for g, n in columns.items())
        if need + len(self.running) * groups[self.rules.decode_group].layers \
                > self.manager.available():
            return False
        for g in columns:  # every hit taken before an allocation can evict it
            req.tables[g] = [self.manager.share(groups[g], d) for d in req.digests[:hits]] \
                if g in prefix else []
            req.lengths[g] = len(req.tables[g]) * size
        for g, n in columns.items():
            req.tables[g] += [self.manager.allocate(groups[g])
                              for _ in range(self.blocks(n) - len(req.tables[g]))]
        if not req.output and not req.preemptions:  # its first prefill: what a client sees
            self.prompt_tokens += len(req.prompt)
            self.hit_tokens += hits * size
            req.cached_tokens = hits * size
        return True

    def make_room(self):
        """A block for the next column of every running request whose blocks are full, each
        request in turn, preempting the one admitted last while the pool has too few pages."""
        g, group = self.rules.decode_group, self.rules.groups[self.rules.decode_group]
        for req in list(self.running):
            if req not in self.running or req.lengths[g] < len(req.tables[g]) * self.size:
                continue
            while self.manager.available() < group.layers and req in self.running:
                self.preempt(self.running[-1])
            if req in self.running:
                req.tables[g].append(self.manager.allocate(group))

    def preempt(self, req):
        self.release(req)
        self.running.remove(req)
        self.waiting.appendleft(req)  # first in line: it waited longest
        req.preemptions, self.preemptions = req.preemptions + 1, self.preemptions + 1

    def release(self, req, groups=None):
        for g in list(req.tables) if groups is None else groups:
            self.manager.release(req.tables.pop(g, []))
            req.lengths.pop(g, None)

    def register(self, req):
        """Make req's full prefix blocks (now written) prefix-cache entries."""
        req.digests = chain_hashes(req.tokens, self.size, req.digests)
        for g, n in self.rules.prefix(req).items():
            for block, digest in zip(req.tables.get(g, [])[:n // self.size], req.digests):
                self.manager.register(block, digest)

    def postprocess(self, batch, tokens, prefill, now):
        """After a step: each request's new columns, its prefix blocks registered, bdd's encoder
        blocks released after a prefill, its token appended; the finished ones (released)."""
        finished = []
        for req, token in zip(batch, tokens):
            if prefill:
                req.lengths.update(self.rules.columns(len(req.prompt), len(req.tokens)))
            else:
                req.lengths[self.rules.decode_group] += 1
            if prefill or req.lengths[self.rules.decode_group] % self.size == 0:
                self.register(req)  # a block can only have filled now
            if prefill:
                self.release(req, self.rules.transient)
            req.output.append(token)
            if req.first_token_at is None:
                req.first_token_at = now
            if req.done:
                req.finished_at = now
                self.release(req)
                self.running.remove(req)
                finished.append(req)
        return finished

