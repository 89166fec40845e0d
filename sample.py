"""
KV-cached generation for dec, encdec and bdd; multi-turn sessions; measured cache and compute.

    python sample.py --out_dir out/bdd --prompt "ROMEO:" --max_new_tokens 200 --stats
    printf 'To be\nor not\n' | python sample.py --out_dir out/bdd --chat --stats

The model's prefill/decode (model.py) keep real KV caches; here they are driven turn by turn:
- dec extends one cache over the whole conversation;
- bdd starts a new decoder block at each turn's last prompt token: only the tokens since the last
  block (the previous reply and the new text) go through its causal encoder, whose cache is kept;
- encdec re-encodes the whole history each turn (its encoder is bidirectional).
Cache bytes are read from the cache tensors; FLOPs are counted by torch's FlopCounterMode.
"""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import cli
from model import ModelConfig, build_model
from pack import get_tokenizer


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, G) the new tokens, up to and including a stop token
    cache: object           # the model's cache after the turn
    encoded: int            # tokens the turn's prefill ran through the encoder (dec: all layers)
    prefill_seconds: float
    decode_seconds: float   # spent in decode steps, len(tokens) - 1 of them


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Next token (B,) from logits (B, vocab): argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """A conversation with one model, one cache across turns.

    `span_sentinel` (span-corruption encdec checkpoints): such a model was trained to fill a
    sentinel, so each turn is generated T5-style: the encoder reads the history plus the sentinel,
    the decoder starts from [eot, sentinel] and writes the span until the next sentinel or eot.
    """

    def __init__(self, model, span_sentinel=None, eot=None):
        self.model, self.span_sentinel, self.eot = model, span_sentinel, eot
        self.cache = None
        self.pending = None   # (B, 1) the last sampled token, not yet fed to the model
        self.history = None   # (B, L) every token of the conversation (span models re-read it)

    def room(self):
        """Positions left in the model's context."""
        used = 0 if self.history is None else self.history.shape[1]
        return self.model.config.block_size - used

    @torch.no_grad()
    def turn(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=()):
        """Feed prompt tokens idx (B, n) as a new turn, then sample up to max_new_tokens."""
        if idx.shape[1] + max_new_tokens - 1 > self.room():
            raise ValueError(f"context full: {idx.shape[1]} prompt tokens and "
                             f"{max_new_tokens} new tokens do not fit in the {self.room()} "
                             f"positions left of block_size {self.model.config.block_size}")
        model, device = self.model, idx.device
        self.history = idx if self.history is None else torch.cat([self.history, idx], 1)
        fresh = idx if self.pending is None else torch.cat([self.pending, idx], 1)
        t0 = time.perf_counter()
        if self.span_sentinel is None:
            logits, self.cache = model.prefill(fresh, self.cache)
        else:
            B = idx.shape[0]
            sentinel = torch.full((B, 1), self.span_sentinel, dtype=torch.long, device=device)
            start = torch.cat([torch.full_like(sentinel, self.eot), sentinel], 1)
            logits, self.cache = model.start(torch.cat([self.history, sentinel], 1), start)
            stop_tokens = (*stop_tokens, self.span_sentinel + 1, self.eot)
        _sync(device)
        t1 = time.perf_counter()
        stops = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)  # (B,)
        out = []
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
            out.append(nxt)
            if i == max_new_tokens - 1:
                break
            if stop_tokens:  # every row has written a stop token
                stopped |= torch.isin(nxt, stops)
                if bool(stopped.all()):
                    break
            logits, self.cache = model.decode(nxt, self.cache)
        _sync(device)
        tokens = torch.stack(out, 1)  # (B, G)
        self.pending = tokens[:, -1:]
        self.history = torch.cat([self.history, tokens], 1)
        return Generation(tokens, self.cache, self.cache.encoded, t1 - t0, time.perf_counter() - t1)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), span_sentinel=None, eot=None):
    """Sample max_new_tokens after the prompt idx (B, P) with a KV cache: a one-turn Session."""
    return Session(model, span_sentinel, eot).turn(idx, max_new_tokens, temperature, top_k,
                                                    generator, stop_tokens)


# -----------------------------------------------------------------------------
# measuring a decode step

# torch's FlopCounterMode has no formula for the CPU flash-attention kernel SDPA uses; give it
# the same formula as for the GPU kernels, so attention is counted on every device.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


@torch.no_grad()
def decode_flops(model, idx_next, cache):
    """FLOPs of one decode step, split into the layers and the LM head (the head costs the same
    for every arch). Feeds idx_next into the cache like an ordinary decode step."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter:
        model.decode(idx_next, cache)
    total = counter.get_total_flops()
    # Counts are keyed by module path; the only Linear called outside a block is the LM head.
    head = sum(counter.get_flop_counts().get("Linear", {}).values())
    return {"layers": total - head, "head": head}


@torch.no_grad()
def measure_decode(model, context_len, n_tokens=16, batch_size=1, seed=0):
    """Prefill a random prompt so that `context_len` positions are held after n_tokens greedy
    decode steps, then report the live cache bytes, the ms per decoded token and the FLOPs of one
    more step. `context_len` counts the positions fed (prompt + decoded), at most block_size - 1."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    P = context_len - n_tokens
    if P < 1 or context_len >= model.config.block_size:
        raise ValueError(f"context_len {context_len} must lie in ({n_tokens}, "
                         f"{model.config.block_size})")
    prompt = torch.randint(model.config.vocab_size, (batch_size, P), generator=g).to(device)
    gen = generate(model, prompt, n_tokens + 1, temperature=0)
    nbytes = gen.cache.nbytes()
    flops = decode_flops(model, gen.tokens[:, -1], gen.cache)
    return {"context_len": context_len, "kv_bytes": nbytes["decode"], "prefix_bytes": nbytes["prefix"],
            "allocated_bytes": nbytes["allocated"], "flops": flops,
            "ms_per_token": 1000 * gen.decode_seconds / n_tokens}


# -----------------------------------------------------------------------------
# command line


def load_checkpoint(out_dir, device="cpu"):
    """(model in eval mode, checkpoint dict without weights) from out_dir/ckpt.pt."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; train one first (python train.py --out_dir "
                         f"{out_dir}) or pass --out_dir of a trained run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = build_model(ckpt["arch"], ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable nanoBDD checkpoint ({type(e).__name__}); "
                         f"retrain or restore it") from None
    ckpt.pop("model")
    ckpt.pop("optimizer", None)
    return model.to(device).eval(), ckpt


def read_prompt(text):
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the prompt file {path}: {e}") from None
    return text


def format_stats(gen, prompt_len):
    n = gen.tokens.shape[1]
    b = gen.cache.nbytes()
    rate = (n - 1) / gen.decode_seconds if n > 1 and gen.decode_seconds > 0 else float("nan")
    return (f"prompt {prompt_len} tokens, encoded {gen.encoded}, generated {n} | "
            f"prefill {1000 * gen.prefill_seconds:.1f} ms, decode {rate:.1f} tokens/s | "
            f"KV cache: decode {b['decode']:,} B, prefix {b['prefix']:,} B, "
            f"allocated {b['allocated']:,} B")


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out_dir", default="out/bdd", help="folder with ckpt.pt from train.py")
    p.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stats", action="store_true", help="print token counts, speed, cache bytes "
                   "and FLOPs per decoded token")
    p.add_argument("--chat", action="store_true", help="multi-turn: one user turn per stdin line")
    p.add_argument("--truncate", action="store_true", help="left-truncate a prompt that does not "
                   "fit instead of refusing it")
    args = p.parse_args(argv)

    if args.max_new_tokens < 1 or args.num_samples < 1:
        cli.fail("--max_new_tokens and --num_samples must be at least 1")
    if args.temperature < 0:
        cli.fail(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 1:
        cli.fail(f"--top_k must be at least 1, got {args.top_k}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        cli.fail(f"device {args.device!r} is not usable here ({str(e).splitlines()[0]}); try --device cpu")
    try:
        model, ckpt = load_checkpoint(args.out_dir, device)
        prompt = read_prompt(args.prompt)
    except ValueError as e:
        cli.fail(str(e))
    enc = get_tokenizer(ckpt["tokenizer"])
    span = ckpt["arch"] == "encdec" and ckpt.get("objective") == "span"
    span_args = dict(span_sentinel=enc.n_vocab, eot=enc.eot_token) if span else {}
    block_size = model.config.block_size
    if args.max_new_tokens > block_size:
        cli.fail(f"--max_new_tokens {args.max_new_tokens} runs past the model's context "
             f"(block_size {block_size}); use at most {block_size}")
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    ctx = (torch.autocast(device.type, dtype=getattr(torch, args.dtype))
           if args.dtype != "float32" else nullcontext())
    sampling = dict(temperature=args.temperature, top_k=args.top_k, generator=g)
    print(f"{ckpt['arch']} model from {args.out_dir} (iter {ckpt.get('iter_num', '?')}, "
          f"{model.num_params() / 1e6:.2f}M non-embedding parameters, {ckpt['tokenizer']} tokens)",
          file=sys.stderr)

    def encode(text):
        ids = enc.encode(text, disallowed_special=())
        return torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)

    def text_of(tokens):
        ids = [t for t in tokens.tolist() if t < enc.n_vocab and t != enc.eot_token]
        return enc.decode(ids)

    if args.chat:
        session = Session(model, **span_args)
        print("chat: one turn per line; end with Ctrl-D", file=sys.stderr)
        for n_turn, line in enumerate(sys.stdin, 1):
            idx = encode(line if line.endswith("\n") else line + "\n")
            budget = min(args.max_new_tokens, session.room() - idx.shape[1] + 1)
            if budget < 1:
                print("the conversation has filled the model's context; start a new one",
                      file=sys.stderr)
                break
            with ctx:
                gen = session.turn(idx, budget, stop_tokens=(enc.eot_token,), **sampling)
            print(text_of(gen.tokens[0]), flush=True)
            if args.stats:
                print(f"[turn {n_turn}] " + format_stats(gen, idx.shape[1]), file=sys.stderr)
        return

    if not prompt:
        cli.fail("the prompt is empty; give some text with --prompt")
    idx = encode(prompt)
    room = block_size - args.max_new_tokens + 1
    if idx.shape[1] > room:
        if not args.truncate:
            cli.fail(f"the prompt has {idx.shape[1]} tokens but only {room} fit with "
                 f"--max_new_tokens {args.max_new_tokens} in block_size {block_size}; shorten it, "
                 f"lower --max_new_tokens, or pass --truncate to keep its last {room} tokens")
        idx = idx[:, -room:]
    with ctx:
        gen = generate(model, idx, args.max_new_tokens, **sampling, **span_args)
        # one more decode step, counted; it needs one more free position in the context
        measurable = args.stats and idx.shape[1] + gen.tokens.shape[1] <= block_size
        flops = decode_flops(model, gen.tokens[:, -1], gen.cache) if measurable else None
    for row in gen.tokens:
        print(prompt + text_of(row))
        print("---------------")
    if args.stats:
        print(format_stats(gen, idx.shape[1]))
        if flops is None:
            print("FLOPs per decoded token: not counted, the context has no free position for one "
                  "more step (lower --max_new_tokens by one)")
        else:
            print(f"FLOPs per decoded token (batch {args.num_samples}): layers "
                  f"{flops['layers']:,}, LM head {flops['head']:,}")


if __name__ == "__main__":
    main()
