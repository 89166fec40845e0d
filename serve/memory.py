"""
The memory a cache holds, and the memory a request will need before anything is allocated
(DESIGN.md section 3).

- held_bytes, nbytes: every byte of tensor storage a cache holds, per device, read from its live
  tensors (each storage once and whole: a view holds all of its base; an empty column is held);
- bytes_after, request_bytes: what a one-turn request's cache and its sampling will hold, from
  the model's shape alone (sample.py refuses a request over its limit before allocating it);
- available_memory: what this process may take now.
"""

import math
import os

import torch

from model import CHUNK, BlockDoubleDecoder, EncoderDecoder


def held_bytes(tensors):
    """{device: bytes} of the storages under tensors, each counted once and whole."""
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors}
    held = {}
    for (device, _), n in storages.items():
        held[device] = held.get(device, 0) + n
    return held


def filled_bytes(layers):
    """Bytes of the K/V columns the layer caches have filled."""
    return sum(2 * c.k[:, :, :c.length].numel() * c.k.element_size()
               for c in layers if c.k is not None)


def nbytes(cache):
    """What a cache (model.Cache, or serve/cache.py's) holds:

    held:        {device: bytes} of every tensor storage reachable from it: what a server's
                 batch is limited by;
    prefix_held: {device: bytes}, the part of held that is bdd's encoder cache (a session's; on
                 "cpu" once offloaded; {} once dropped, and for dec and encdec);
    decode:      filled K/V bytes that decode steps read (padding columns included);
    prefix:      filled K/V bytes of bdd's encoder cache.
    """
    decoder = getattr(cache, "decoder", cache)
    encoder = getattr(cache, "encoder", None)
    cross = sum(t.numel() * t.element_size() for pair in decoder.cross or () for t in pair)
    return {"held": held_bytes(cache.tensors()),
            "prefix_held": held_bytes(cache.encoder_tensors()) if encoder else {},
            "decode": filled_bytes(decoder.layers) + cross,
            "prefix": filled_bytes(encoder.layers) if encoder else 0}


def bytes_after(model, rows, prompt_len, new_tokens, element_size, span=False):
    """Bytes the KV cache of a one-turn request (generate.generate) holds after its last decode
    step, from the model's shape alone: each layer cache the decode steps read (dec: one per
    K/V-projecting layer; bdd: each decoder layer's [encoder states | block]; encdec: each
    decoder layer's self K/V), its columns rounded up to the CHUNKs it grows by, plus encdec's
    cross K/V of the source (exact), x rows x 2 (K and V) x n_kv_head x head size x
    element_size. span: an encdec generated T5-style (serve.Session)."""
    c = model.config
    if isinstance(model, EncoderDecoder):  # the decoder starts at the last prompt token
        stream, source = (2 if span else 1) + new_tokens - 1, prompt_len + (1 if span else -1)
    else:
        stream, source = prompt_len + new_tokens - 1, 0
    columns = len(model.cached_layers()) * (math.ceil(stream / CHUNK) * CHUNK + source)
    return columns * rows * 2 * c.n_kv_head * (c.n_embd // c.n_head) * element_size


def request_bytes(model, prompt_lens, new_tokens, element_size, span=False):
    """The memory one batch of a one-turn request needs at its peak, estimated: its KV cache
    after the last step (bytes_after; each row as long as the longest) and what it computes with
    (working_bytes). prompt_lens: one per row (a prompt repeated for its samples)."""
    P, rows = max(prompt_lens), len(prompt_lens)
    return bytes_after(model, rows, P, new_tokens, element_size, span) + \
        working_bytes(model, rows, P, new_tokens)


def chat_bytes(model, element_size):
    """The most a one-row conversation (serve.session.Session) holds at once, estimated: K/V of
    the whole context in every layer it caches (bdd: its encoder's too, kept between turns or
    filled by each prefill; encdec: its source's cross K/V besides its own), grown in CHUNKs, and
    what a context-long prefill computes with."""
    c = model.config
    extra = c.n_enc_layer if isinstance(model, BlockDoubleDecoder) else \
        c.n_dec_layer if isinstance(model, EncoderDecoder) else 0
    columns = math.ceil(c.block_size / CHUNK) * CHUNK
    kv = (len(model.cached_layers()) + extra) * columns * 2 * c.n_kv_head * (c.n_embd // c.n_head)
    return kv * element_size + working_bytes(model, 1, c.block_size, 1)


def working_bytes(model, rows, P, new_tokens):
    """Besides the K/V: which columns are real (a byte per row and column), a step's logits in
    float32 four times over (the copies sampling makes), and a prefill's largest activations
    (one layer's attention scores and MLP states in float32)."""
    c = model.config
    valid = rows * (P + new_tokens + 1)
    logits = 4 * rows * c.vocab_size * 4
    prefill = rows * P * (c.n_head * P + 8 * c.n_embd) * 4
    return valid + logits + prefill


def available_memory(device):
    """Bytes free for this process on device now: the GPU's free memory, or the machine's
    available memory (MemAvailable: free plus what the kernel can reclaim), within the
    container's memory limit (cgroup v2) if it has one."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # no /proc: all of it
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(g.read()))
    except (OSError, StopIteration, ValueError):
        pass
    return free
