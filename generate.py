"""
KV-cached generation, one turn, in the spirit of gpt-fast: prefill the prompt, then decode one
token at a time, feeding back the token just sampled (DESIGN.md section 3).

    tokens = generate(model, idx, max_new_tokens=200, temperature=0.8, top_k=200)  # (B, G)

The same loop runs on any cache with model.Cache's interface: serve/cache.py's for prompts of
different lengths, and StaticCache below, of fixed shapes, for a compiled decode step.
"""

import torch

from model import Cache


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Next token (B,) from logits (B, vocab): argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()  # the largest is 0 before the division: no inf at any temperature
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), cache=None, compile=False):
    """max_new_tokens new tokens (B, G) after the prompts idx (B, P). G is shorter when every row
    has written one of stop_tokens (a row that stopped goes on decoding: its later tokens are not
    its answer). cache: a new cache to fill (default model.new_cache()), for a caller that reads
    it after, or one of serve/'s. compile: the decode steps run compiled, on a StaticCache."""
    cache = model.new_cache() if cache is None else cache
    assert not compile or type(cache) is Cache, "compiled decoding takes prompts of one length"
    logits, decode = model.prefill(idx, cache), model.decode
    if compile:
        cache, decode = StaticCache(cache, model.config.block_size), compiled_decode(model)
    sampling = dict(temperature=temperature, top_k=top_k, generator=generator)
    return decode_steps(decode, logits, cache, max_new_tokens, sampling, stop_tokens)


def decode_steps(decode, logits, cache, max_new_tokens, sampling, stop_tokens=(),
                 before_step=None):
    """Sample a token per row from logits (B, vocab), feed it with decode(idx (B, 1), cache), and
    so on: (B, G) tokens, G < max_new_tokens once every row has written a stop token.
    before_step(stopped (B,) bool) is called before each step once some row has stopped."""
    stops = torch.tensor(stop_tokens, dtype=torch.long, device=logits.device)
    stopped, out = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), []
    for i in range(max_new_tokens):
        out.append(sample_next(logits, **sampling))  # (B,)
        if stop_tokens:
            stopped |= torch.isin(out[-1], stops)
        n_stopped = int(stopped.sum()) if stop_tokens else 0  # one host sync a step
        if i == max_new_tokens - 1 or n_stopped == len(stopped):
            break
        if before_step is not None and n_stopped:
            before_step(stopped)
        logits = decode(out[-1][:, None], cache)
    return torch.stack(out, dim=1)


# -----------------------------------------------------------------------------
# compiled decoding: every step the same shapes


class StaticKV:
    """One layer's keys and values for the whole context, allocated once: each step writes its
    column at its position and attends to every column under the cache's mask."""

    def __init__(self, cache, layer, block_size):
        B, nh, _, hs = layer.k.shape
        self.cache, n = cache, layer.length
        self.k, self.v = (t.new_zeros(B, nh, block_size, hs) for t in (layer.k, layer.v))
        self.k[:, :, :n], self.v[:, :, :n] = layer.k[:, :, :n], layer.v[:, :, :n]

    def update(self, k, v):
        self.k.index_copy_(2, self.cache.positions, k)
        self.v.index_copy_(2, self.cache.positions, v)
        return self.k, self.v


class StaticCache(Cache):
    """A prefilled model.Cache copied into buffers of fixed shapes (gpt-fast's): block_size
    columns per layer and the next position a tensor, so that a compiled decode step is one graph
    for every step. It holds the whole context, where model.Cache holds what its rows need."""

    def __init__(self, cache, block_size):
        super().__init__(0, cache.device)
        self.layers = [StaticKV(self, layer, block_size) for layer in cache.layers]
        self.cross, self.cross_mask = cache.cross, cache.cross_mask
        self.pos = torch.tensor([cache.pos], device=cache.device)
        self.columns = torch.arange(block_size, device=cache.device)
        if self.device.type == "cuda":  # CUDA graphs replay on these very buffers
            for t in [self.pos] + self.tensors():
                torch._dynamo.mark_static_address(t)

    def next(self, n):
        """One new column per row: its position (1,), and the columns written so far (1, L)."""
        assert n == 1, "a static cache decodes one column at a time"
        self.positions = self.pos.clone()
        self.pos.add_(1)
        return self.positions, self.columns <= self.positions[:, None]


def compiled_decode(model):
    """model.decode compiled for a StaticCache: torch.compile (the first steps compile it), with
    CUDA graphs on CUDA (mode reduce-overhead)."""
    mode = "reduce-overhead" if model.wte.weight.is_cuda else None
    return torch.compile(model.decode, mode=mode, fullgraph=True)
