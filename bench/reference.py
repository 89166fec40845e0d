"""
How close nanoBDD's code is to lean references at the same shape (the CPU compare preset: 6 layers,
4 heads, n_embd 128, rows of 256, batch 16, vocab 257), timed in interleaved rounds, medians:

- training: one AdamW step (forward, backward, update) of the project's dec and bdd against a
  nanoGPT-style GPT written here (LayerNorm, learned positions, fused QKV, SDPA causal);
- decoding: ms per token of the project's eager decode step (generate.decode_steps, as generate()
  runs it) against a lean static-cache step written here (one fused QKV matrix, index_copy_ into
  a preallocated cache, SDPA with a position mask, argmax) that computes the same model with the
  same weights (checked: the same tokens); bdd's lean step runs its decoder layers over the K/V
  that its prefill left;
- compiled decoding: generate(compile=True)'s decode steps against eager, and the compile time.

    python bench/reference.py                      # 1 and 2 threads, batch 1 and 64
    python bench/reference.py --threads 1 --rounds 5 --skip_compile

Each ratio is the median over rounds of the two times measured side by side in that round (paired,
so that a machine whose speed drifts from round to round still compares like with like); the times
printed are medians. Absolute times depend on the machine and its load.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import StaticCache, compiled_decode, decode_steps  # noqa: E402
from mask import block_ids  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402

SHAPE = dict(vocab_size=257, block_size=256, n_layer=6, n_head=4, n_embd=128)
BATCH, GREEDY = 16, dict(temperature=0)


# -----------------------------------------------------------------------------
# a nanoGPT-style GPT: the training reference


class GPTBlock(nn.Module):

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, batch):
        x, y = batch["x"], batch["y"]
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.ln_f(h))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def train_steps(rounds):
    """{name: median ms} of one AdamW step of each model, interleaved."""
    torch.manual_seed(0)
    T = SHAPE["block_size"]
    models = {"nanoGPT-style": GPT(**SHAPE), "dec": build_model("dec", ModelConfig(**SHAPE)),
              "bdd": build_model("bdd", ModelConfig(**SHAPE))}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    times = {n: [] for n in models}
    for r in range(rounds + 1):  # round 0 warms up
        g = torch.Generator().manual_seed(r)
        w = torch.randint(SHAPE["vocab_size"], (BATCH, T + 1), generator=g)
        bounds = [sorted(torch.randperm(T - 1, generator=g)[:3].add(1).tolist()) for _ in range(4)]
        batch = {"x": w[:, :-1], "y": w[:, 1:], "block_ids": block_ids(T, bounds)}
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = model(batch)[1]
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if r:
                times[name].append(1000 * (time.perf_counter() - t0))
    return times


def medians(times):
    return {n: statistics.median(t) for n, t in times.items()}


def ratio(times, a, b):
    """The median over rounds of a's time over b's in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# -----------------------------------------------------------------------------
# a lean static-cache decode step of the project's dec (or bdd's decoder layers)


class LeanDecoder:
    """The layers of a project model's decode step as lean code: per layer one fused QKV matrix
    (its c_attn), K/V written with index_copy_ into buffers of the whole
    context, SDPA under a position mask, RoPE and RMSNorm computed inline. cache: the project's
    Cache after a prefill, whose filled K/V it starts from."""

    def __init__(self, model, layers, cache):
        self.model, self.layers = model, list(layers)
        c = model.config
        self.hs, self.nh, self.nkv = c.n_embd // c.n_head, c.n_head, c.n_kv_head
        self.qkv = [b.attn.c_attn.weight for b in self.layers]
        B = cache.layers[0].k.shape[0]
        self.k = [torch.zeros(B, self.nkv, c.block_size, self.hs) for _ in self.layers]
        self.v = [torch.zeros(B, self.nkv, c.block_size, self.hs) for _ in self.layers]
        for kb, vb, layer in zip(self.k, self.v, cache.layers):
            kb[:, :, :layer.length], vb[:, :, :layer.length] = layer.k[:, :, :layer.length], \
                layer.v[:, :, :layer.length]
        self.pos = torch.tensor([cache.pos])
        self.columns = torch.arange(c.block_size)

    def rms(self, x, norm):
        eps = norm.eps or torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight

    def rope(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    @torch.no_grad()
    def step(self, idx):
        """idx (B, 1) -> next-token logits (B, vocab)."""
        m, B = self.model, idx.shape[0]
        x = m.wte(idx)  # (B, 1, C)
        cos, sin = m.rotary.cos[self.pos], m.rotary.sin[self.pos]
        mask = self.columns <= self.pos[:, None]  # (1, block_size)
        for block, w, kb, vb in zip(self.layers, self.qkv, self.k, self.v):
            qkv = F.linear(self.rms(x, block.ln_1), w).view(B, 1, self.nh + 2 * self.nkv, self.hs)
            q, k, v = qkv.transpose(1, 2).split([self.nh, self.nkv, self.nkv], dim=1)
            kb.index_copy_(2, self.pos, self.rope(k, cos, sin))
            vb.index_copy_(2, self.pos, v)
            y = F.scaled_dot_product_attention(self.rope(q, cos, sin), kb, vb, attn_mask=mask,
                                               enable_gqa=self.nkv != self.nh)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(self.rms(x, block.ln_2))))
        self.pos += 1
        return m.lm_head(self.rms(x[:, -1], m.ln_f))


def decode_times(arch, batch, context, steps, rounds, compile_too):
    """{name: median ms per decode step} of the project's eager step, the lean step (and the
    compiled step), interleaved, each from the same prefill of `context - steps` tokens."""
    torch.manual_seed(0)
    model = build_model(arch, ModelConfig(**SHAPE)).eval()
    prompt = torch.randint(SHAPE["vocab_size"], (batch, context - steps))
    layers = model.blocks if arch == "dec" else model.decoder
    runners = {"eager": None, "lean": None}
    if compile_too:
        runners["compiled"] = None
    times, compile_seconds = {n: [] for n in runners}, None
    with torch.no_grad():
        for r in range(rounds + 1):
            for name in runners:
                cache = model.new_cache()
                logits = model.prefill(prompt, cache)
                t0 = time.perf_counter()
                if name == "lean":
                    lean, nxt = LeanDecoder(model, layers, cache), logits.argmax(-1)
                    t0 = time.perf_counter()
                    out = [nxt]
                    for _ in range(steps - 1):
                        nxt = lean.step(nxt[:, None]).argmax(-1)
                        out.append(nxt)
                    tokens = torch.stack(out, 1)
                elif name == "compiled":
                    static = StaticCache(cache, SHAPE["block_size"])
                    t0 = time.perf_counter()
                    tokens = decode_steps(compiled_decode(model), logits, static, steps, GREEDY)
                else:
                    tokens = decode_steps(model.decode, logits, cache, steps, GREEDY)
                seconds = time.perf_counter() - t0
                if r == 0 and name == "compiled":
                    compile_seconds = seconds
                if name == "eager":
                    reference = tokens
                assert torch.equal(tokens, reference), f"{name} gave other tokens than eager"
                if r:
                    times[name].append(1000 * seconds / (steps - 1))
    return times, compile_seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batches", default="1,64", help="decode batch sizes")
    p.add_argument("--skip_compile", action="store_true")
    args = p.parse_args()
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        times = train_steps(args.rounds)
        print(f"[{threads} thread(s)] training step ms: " + ", ".join(
            f"{n} {v:.1f}" for n, v in medians(times).items()) +
            f" | dec/ref {ratio(times, 'dec', 'nanoGPT-style'):.3f}, bdd/ref "
            f"{ratio(times, 'bdd', 'nanoGPT-style'):.3f}, bdd tokens/s over dec's "
            f"{ratio(times, 'dec', 'bdd'):.3f}", flush=True)
        for batch in map(int, args.batches.split(",")):
            for arch in ("dec", "bdd"):
                times, compile_s = decode_times(arch, batch, 72, 64, max(3, args.rounds // 2),
                                                not args.skip_compile and batch == 1)
                line = (f"[{threads} thread(s)] {arch} decode batch {batch}, context 8 to 72, ms "
                        f"per token: " + ", ".join(f"{n} {v:.3f}" for n, v in
                                                   medians(times).items()) +
                        f" | eager/lean {ratio(times, 'eager', 'lean'):.3f}")
                if "compiled" in times:
                    line += (f", eager/compiled {ratio(times, 'eager', 'compiled'):.2f}x (compile "
                             f"and first steps {compile_s:.1f} s)")
                print(line, flush=True)

if __name__ == "__main__":
    main()
