"""
Where a decode step's time goes, dec against bdd, as the batch grows: how much of bdd's time per
token is its decoder layers, and how much the per-step work every arch shares.

    python bench/decode_profile.py                          # CPU-preset shapes, context 128
    python bench/decode_profile.py --batches 1,64 --threads 1 --rounds 9

Fresh models of the CPU preset's shape (6 layers, 4 + 2 for bdd, n_embd 128, byte vocab). For
each batch: ms per greedy decode step, and the part of it spent inside the decoder layers (from
the first layer's start to the last layer's end); the rest (embedding, final norm, LM head,
sampling, cache bookkeeping) is the same work for every arch. Rounds alternate between the archs;
medians count. Also the torch ops one step dispatches (counted by torch.profiler: no timing noise).
If bdd/dec of the layers stays near n_dec / n_layer while bdd/dec of the whole step grows with
the batch, the growth is per-step work that does not shrink with the layer count.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import ModelConfig, build_model  # noqa: E402
from generate import sample_next  # noqa: E402

SHAPE = dict(vocab_size=257, block_size=256, n_layer=6, n_dec_layer=2, n_head=4, n_embd=128)


def decode_layers(model):
    return model.blocks if hasattr(model, "blocks") else model.decoder


@torch.no_grad()
def one_round(model, batch, context, steps):
    """Median ms of a whole decode step and of its layers, after a prefill to context - steps."""
    marks = []
    layers = decode_layers(model)
    hooks = [layers[0].register_forward_pre_hook(lambda *a: marks.append(time.perf_counter())),
             layers[-1].register_forward_hook(lambda *a: marks.append(time.perf_counter()))]
    try:
        prompt = torch.randint(SHAPE["vocab_size"], (batch, context - steps))
        cache = model.new_cache()
        logits = model.prefill(prompt, cache)
        marks.clear()
        whole = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model.decode(sample_next(logits, temperature=0)[:, None], cache)
            whole.append(time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.remove()
    inside = [end - start for start, end in zip(marks[::2], marks[1::2])]
    return 1000 * statistics.median(whole), 1000 * statistics.median(inside)


@torch.no_grad()
def ops_per_step(model, batch, context):
    """Top-level torch ops one decode step dispatches (sampling included)."""
    cache = model.new_cache()
    logits = model.prefill(torch.randint(SHAPE["vocab_size"], (batch, context - 1)), cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.decode(sample_next(logits, temperature=0)[:, None], cache)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for arch in ("dec", "bdd"):
        torch.manual_seed(0)
        models[arch] = build_model(arch, ModelConfig(**SHAPE)).eval()
    print(f"{args.threads} threads, context {args.context}, {args.steps} steps x {args.rounds} rounds")
    print("ops per step: " + ", ".join(f"{a} {ops_per_step(m, 1, args.context)}"
                                       for a, m in models.items()))
    print(f"{'batch':>5} | {'dec step ms':>11} {'layers':>7} {'rest':>6} | {'bdd step ms':>11} "
          f"{'layers':>7} {'rest':>6} | bdd/dec step, layers")
    for batch in (int(b) for b in args.batches.split(",")):
        runs = {arch: [] for arch in models}
        for _ in range(args.rounds):
            for arch, model in models.items():
                runs[arch].append(one_round(model, batch, args.context, args.steps))
        (ds, dl), (bs, bl) = ([statistics.median(r[i] for r in runs[a]) for i in (0, 1)]
                              for a in ("dec", "bdd"))
        print(f"{batch:5d} | {ds:11.3f} {dl:7.3f} {ds - dl:6.3f} | {bs:11.3f} {bl:7.3f} "
              f"{bs - bl:6.3f} | {bs / ds:.3f}, {bl / dl:.3f}")


if __name__ == "__main__":
    main()
