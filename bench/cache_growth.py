"""
Decode speed with caches that grow as they fill against caches allocated for the whole context
up front, dec and bdd: growing must not make decoding measurably slower.

    python bench/cache_growth.py                       # cpu-preset shapes, batches 1 and 64
    python bench/cache_growth.py --threads 2 --rounds 9
    python bench/cache_growth.py --shape gpu --device cuda --dtype bfloat16

"grown" is the library as it is: each KV cache grows model.CHUNK columns at a time, copying the
filled ones into the larger buffer. "whole" gives the cache layers (WholeKV) that allocate every
column of the context on their first append, as a preallocating cache does (the library's
KVCache is not touched). Fresh models of the preset's shape; each measurement is a one-turn
generation as generate() runs it (model.new_cache(); bdd's encoder runs without a cache): a
prefill of --prompt tokens, then --steps greedy decode steps timed as one span, so that the
copies on growth (one per CHUNK steps) are inside it; ms per step = span / steps. Rounds after
a warm-up alternate between the archs and the two caches (their order flipped every round);
medians count. The bytes each cache holds after the span are printed beside it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import CHUNK, KVCache, ModelConfig, build_model  # noqa: E402
from generate import sample_next  # noqa: E402
from serve.memory import nbytes  # noqa: E402

SHAPES = {"cpu": dict(vocab_size=257, block_size=256, n_layer=6, n_dec_layer=2, n_head=4,
                      n_embd=128),
          "gpu": dict(vocab_size=50304, block_size=1024, n_layer=12, n_dec_layer=4, n_head=12,
                      n_embd=768)}
CACHES = ("grown", "whole")


class WholeKV(KVCache):
    """A layer cache that holds block_size columns from its first append on: it never grows."""

    def __init__(self, block_size):
        super().__init__()
        self.block_size = block_size

    def grown(self, buffer, like, end):
        B, nh, _, hs = like.shape
        new = like.new_empty(B, nh, max(end, self.block_size), hs)
        if self.length:
            new[:, :, :self.length] = buffer[:, :, :self.length]
        return new


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_span(model, kind, batch, prompt_len, steps, seed):
    """(ms per decode step over `steps` steps after a prefill of prompt_len tokens, bytes the
    cache then holds on the model's device)."""
    device = next(model.parameters()).device
    cache = model.new_cache()
    if kind == "whole":
        cache.layers = [WholeKV(model.config.block_size) for _ in cache.layers]
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    logits = model.prefill(prompt, cache)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.decode(sample_next(logits, temperature=0)[:, None], cache)
    sync(device)
    seconds = time.perf_counter() - t0
    return 1000 * seconds / steps, nbytes(cache)["held"].get(str(device), 0)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--shape", default="cpu", choices=SHAPES)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt", type=int, help="prompt tokens (default 3/8 of block_size: 96)")
    p.add_argument("--steps", type=int, help="decode steps timed (default block_size / 4: 64)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    block_size = SHAPES[args.shape]["block_size"]
    args.prompt = args.prompt or 3 * block_size // 8
    args.steps = args.steps or block_size // 4
    if not (1 <= args.prompt and 1 <= args.steps and args.prompt + args.steps <= block_size):
        p.error(f"--prompt {args.prompt} and --steps {args.steps} must be at least 1 and fit in "
                f"block_size {block_size} together")
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = {}
    for arch in ("dec", "bdd"):
        torch.manual_seed(0)
        models[arch] = build_model(arch, ModelConfig(**SHAPES[args.shape])).to(device, dtype).eval()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{args.shape} shape on {device} ({args.dtype}, {args.threads} threads): prefill "
          f"{args.prompt} tokens, {args.steps} decode steps timed; grown: {CHUNK} columns at a "
          f"time, whole: block_size {SHAPES[args.shape]['block_size']} up front; "
          f"{args.rounds} rounds after a warm-up, medians")
    times = {(a, b, k): [] for a in models for b in batches for k in CACHES}
    held = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for batch in batches:
            for arch, model in models.items():
                for kind in (CACHES if r % 2 else CACHES[::-1]):
                    ms, held[arch, batch, kind] = decode_span(model, kind, batch, args.prompt,
                                                              args.steps, seed=r)
                    if r:
                        times[arch, batch, kind].append(ms)
    print(f"{'arch':>4} {'batch':>5} | {'grown ms/step':>13} {'whole ms/step':>13} "
          f"{'grown/whole':>11} | {'grown MB held':>13} {'whole MB held':>13}")
    for batch in batches:
        for arch in models:
            grown, whole = (statistics.median(times[arch, batch, k]) for k in CACHES)
            print(f"{arch:>4} {batch:5d} | {grown:13.3f} {whole:13.3f} {grown / whole:11.3f} | "
                  f"{held[arch, batch, 'grown'] / 1e6:13.3f} {held[arch, batch, 'whole'] / 1e6:13.3f}")


if __name__ == "__main__":
    main()
