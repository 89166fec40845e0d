"""
KV-cached generation for dec, encdec and bdd; multi-turn sessions; measured cache and compute.

    python sample.py --out_dir out/bdd --prompt "ROMEO:" --max_new_tokens 200 --stats
    python sample.py --out_dir out/bdd --prompts prompts.txt --batch_size 8 --num_samples 2
    printf 'To be\nor not\n' | python sample.py --out_dir out/bdd --chat --stats

The model's prefill/decode (model.py) keep real KV caches; here they are driven turn by turn:
- dec extends one cache over the whole conversation;
- bdd starts a new decoder block at each turn's last prompt token: only the tokens since the last
  block (the previous reply and the new text) go through its causal encoder, whose cache is kept
  (--prefix_cache keep; drop frees it and re-encodes the history each turn; offload parks it in
  host memory between turns);
- encdec re-encodes the whole history each turn (its encoder is bidirectional).
One-turn generation keeps only what its decode steps read (bdd's encoder cache is freed).
A batch of prompts of different lengths is left-padded and each row gets what it would get alone;
--num_samples prefills a prompt once and copies its cache into each sample's row. The memory a
request needs is computed from the model's shape before anything is allocated, and a request over
its limit (--memory_limit_mb; by default half the memory available) is refused with one line.
Cache bytes are every byte the cache tensors hold; FLOPs are counted by torch's FlopCounterMode.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import cli
import config as cfg
from corpus import get_tokenizer
from flops import decode_flops
from cache import PREFIX_POLICIES


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, G) the new tokens; a row that stopped early repeats its stop token
    cache: object           # the model's cache after the turn
    encoded: int            # columns the turn's prefill ran through the encoder (dec: all layers)
    prefill_seconds: float
    decode_seconds: float   # spent in decode steps, G - 1 of them
    lengths: list           # per row, its new tokens up to and including its stop token


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


def left_pad(rows):
    """Token rows of any lengths (1-D tensors) -> idx (B, n), valid (B, n) bool (False = padding)
    or None when no row is padded: each row right-aligned, so that every row's last token sits in
    the last column (bdd's block boundary is then one column for the whole batch)."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    idx = rows[0].new_zeros(len(rows), n)
    valid = torch.zeros(len(rows), n, dtype=torch.bool, device=idx.device)
    for b, r in enumerate(rows):
        idx[b, n - len(r):] = r
        valid[b, n - len(r):] = True
    return idx, valid


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """A conversation with one model, one cache across turns, for one row or a batch of rows.

    A turn's prompts may have different lengths: each turn's new tokens are left-padded (padding
    may then sit between turns in a row's cache; the model masks it everywhere), and each row gets
    what it would get alone. A row that writes a stop token feeds padding until the batch is done.

    `span_sentinel` (span-corruption encdec checkpoints): such a model was trained to fill a
    sentinel, so each turn is generated T5-style: the encoder reads the history plus the sentinel,
    the decoder starts from [eot, sentinel] and writes the span until the next sentinel or eot.

    `prefix_cache` (bdd): what each turn's prefill leaves of the encoder's cache for the next turn
    (DESIGN.md section 3). keep: it stays with the session (the next turn encodes only its new
    tokens; memory about dec's); drop: freed once its states are in the decoder layers (the next
    turn re-encodes the whole history, like encdec: less memory, more compute); offload (CUDA):
    moved to pinned host memory, brought back for the next prefill. Every policy gives the same
    tokens and logits. dec and encdec keep no encoder cache: the policy changes nothing for them.
    """

    def __init__(self, model, span_sentinel=None, eot=None, prefix_cache="keep"):
        assert prefix_cache in PREFIX_POLICIES, prefix_cache
        self.model, self.span_sentinel, self.eot = model, span_sentinel, eot
        self.prefix_cache = prefix_cache
        self.ended = False    # a last turn was taken: the cache kept nothing for another
        self.cache = None
        self.pending = None   # (B,) each row's last sampled token, not yet fed to the model
        self.rows = None      # per row, every token of the conversation (1-D tensors)

    @property
    def history(self):
        """(B, L) every token of the conversation, rows left-padded with zeros."""
        return None if self.rows is None else left_pad(self.rows)[0]

    def room(self, row=None):
        """Positions left in the model's context, in one row or in the fullest one. A span model
        keeps one for the sentinel its encoder reads after the history."""
        used = 0 if self.rows is None else (max(len(r) for r in self.rows) if row is None
                                            else len(self.rows[row]))
        return self.model.config.block_size - used - (self.span_sentinel is not None)

    @torch.no_grad()
    def turn(self, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), num_samples=1, last=False):
        """Feed a new turn, then sample up to max_new_tokens per row. prompts: a (B, n) tensor or
        B token sequences of any lengths. num_samples: the turn is prefilled once, then each row's
        cache is copied into that many rows (B * num_samples rows from then on). last: no turn
        follows, so the cache keeps only what decode steps read (no encoder cache, whatever the
        policy, and no token history)."""
        assert not self.ended, "this session's last turn was taken"
        device = (prompts.device if isinstance(prompts, torch.Tensor)
                  else next(self.model.parameters()).device)
        rows = [torch.as_tensor(r, dtype=torch.long).view(-1).to(device) for r in prompts]
        self._check(rows, max_new_tokens, num_samples)
        fresh = rows if self.pending is None else [torch.cat([p.view(1), r])
                                                   for p, r in zip(self.pending, rows)]
        self.rows = rows if self.rows is None else [torch.cat(h) for h in zip(self.rows, rows)]
        t0 = time.perf_counter()
        if self.span_sentinel is None:
            idx, valid = left_pad(fresh)
            logits, self.cache = self.model.prefill(idx, self.cache, valid=valid, prefix_cache=
                                                    "drop" if last else self.prefix_cache)
        else:
            sentinel = torch.tensor([self.span_sentinel], device=device)
            source, source_valid = left_pad([torch.cat([h, sentinel]) for h in self.rows])
            start = torch.tensor([[self.eot, self.span_sentinel]], device=device).expand(len(rows), 2)
            logits, self.cache = self.model.start(source, start, source_valid)
            stop_tokens = (*stop_tokens, self.span_sentinel + 1, self.eot)
        if last:
            self.cache.forget_history()
            self.ended = True
        if num_samples > 1:
            logits = logits.repeat_interleave(num_samples, 0)
            self.cache.repeat_rows(num_samples)
            self.rows = [h for h in self.rows for _ in range(num_samples)]
        _sync(device)
        t1 = time.perf_counter()
        tokens, lengths = self._sample(logits, max_new_tokens, stop_tokens,
                                       dict(temperature=temperature, top_k=top_k, generator=generator))
        _sync(device)
        t2 = time.perf_counter()
        self.pending = tokens[:, -1]
        self.rows = [torch.cat([h, t[:n]]) for h, t, n in zip(self.rows, tokens, lengths)]
        return Generation(tokens, self.cache, self.cache.encoded, t1 - t0, t2 - t1, lengths)

    def _check(self, rows, max_new_tokens, num_samples):
        if self.rows is not None and len(rows) != len(self.rows):
            raise ValueError(f"this session has {len(self.rows)} rows; a turn needs a prompt for "
                             f"each, got {len(rows)}")
        assert num_samples >= 1, num_samples
        if not rows:
            raise ValueError("a turn needs at least one prompt")
        for b, r in enumerate(rows):
            if len(r) == 0:
                raise ValueError(f"prompt {b} is empty")
            if len(r) + max_new_tokens - 1 > self.room(b):
                raise ValueError(f"context full: {len(r)} prompt tokens (row {b}) and "
                                 f"{max_new_tokens} new tokens do not fit in the {self.room(b)} "
                                 f"positions left of block_size {self.model.config.block_size}")

    def _sample(self, logits, max_new_tokens, stop_tokens, sampling):
        """Up to max_new_tokens per row from the prefill's logits (B, vocab). A row that has
        written a stop token feeds padding from then on: its cache stays what it would be alone,
        its stop token pending. Returns tokens (B, G) and each row's length."""
        B, device = logits.shape[0], logits.device
        stops = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for i in range(max_new_tokens):
            nxt = sample_next(logits, **sampling)  # (B,)
            out.append(nxt)
            if i == max_new_tokens - 1:
                break
            valid = None
            if stop_tokens:
                stopped |= torch.isin(nxt, stops)
                n_stopped = int(stopped.sum())
                if n_stopped == B:
                    break
                valid = ~stopped if n_stopped else None
            logits, self.cache = self.model.decode(nxt, self.cache, valid=valid)
        tokens = torch.stack(out, 1)  # (B, G)
        hit = torch.isin(tokens, stops)
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, tokens.shape[1])
        last = tokens.gather(1, (lengths - 1)[:, None])
        after = torch.arange(tokens.shape[1], device=device) >= lengths[:, None]
        return torch.where(after, last, tokens), lengths.tolist()


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), span_sentinel=None, eot=None, num_samples=1):
    """Sample max_new_tokens after each prompt (a (B, P) tensor, or B sequences of any lengths)
    with a KV cache: a one-turn Session, whose cache keeps only what its decode steps read (bdd's
    encoder cache is freed as soon as its states are in the decoder layers). num_samples:
    continuations per prompt, from one prefill whose cache is copied into each (rows
    b * num_samples .. b * num_samples + num_samples - 1)."""
    return Session(model, span_sentinel, eot).turn(prompts, max_new_tokens, temperature, top_k,
                                                    generator, stop_tokens, num_samples, last=True)


# -----------------------------------------------------------------------------
# command line


def read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from None


def read_prompts(args):
    """[(where, text)] to generate from: --prompts FILE, one prompt per line (its newline not
    included; an empty line is refused), or the one --prompt (FILE:path reads it)."""
    if args.prompts is None:
        text = "\n" if args.prompt is None else args.prompt
        if text.startswith("FILE:"):
            path = text[len("FILE:"):]
            text = read_text(path, "prompt file")
            if not text:
                raise ValueError(f"the prompt file {path} is empty; write the prompt in it")
        if not text:
            raise ValueError("the prompt is empty; give some text with --prompt")
        return [("the prompt", text)]
    lines = read_text(args.prompts, "prompts file").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise ValueError(f"the prompts file {args.prompts} is empty; write one prompt per line")
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f"line {empty[0]} of {args.prompts} is empty ({len(empty)} empty lines in "
                         f"all); every line is a prompt: remove the empty ones")
    return [(f"line {i + 1} of {args.prompts}", line) for i, line in enumerate(lines)]


def fit_prompts(prompts, args, room, block_size):
    """[(where, ids)] -> [ids] that fit in the context with --max_new_tokens: each
    left-truncated with --truncate, else refused (ValueError) naming the first that does not
    fit and what would."""
    new_tokens = args.max_new_tokens
    if new_tokens > room:  # no prompt fits, not even cut to its last token
        where, ids = max(prompts, key=lambda p: len(p[1]))
        where = where if len(prompts) == 1 else f"the longest prompt, {where},"
        most = room - len(ids) + 1
        if args.truncate:
            advice = f"use at most {room} (--truncate cuts a prompt down to its last token)"
        elif most < 1:
            advice = f"{where} alone has {len(ids)} tokens: shorten it, or pass --truncate"
        else:
            advice = f"{where} has {len(ids)} tokens, which leave room for at most {most}"
        raise ValueError(f"--max_new_tokens {new_tokens} runs past the model's context "
                         f"(block_size {block_size}); {advice}")
    return [fit_prompt(ids, room - new_tokens + 1, where, args, block_size)
            for where, ids in prompts]


def fit_prompt(ids, fit, where, args, block_size):
    """A prompt's token ids, left-truncated to `fit` with --truncate; refused without it."""
    if len(ids) <= fit:
        return ids
    if not args.truncate:
        raise ValueError(f"{where} has {len(ids)} tokens but only {fit} fit with --max_new_tokens "
                         f"{args.max_new_tokens} in block_size {block_size}; shorten it, lower "
                         f"--max_new_tokens, or pass --truncate to keep its last {fit} tokens")
    return ids[-fit:]


def format_stats(gen, prompt_lens):
    B = len(gen.lengths)
    lens = sorted(set(prompt_lens))
    decoded = sum(gen.lengths) - B  # the first new token of each row comes from the prefill
    b = gen.cache.nbytes()
    rate = decoded / gen.decode_seconds if decoded and gen.decode_seconds > 0 else float("nan")
    return (f"{f'{B} rows, ' if B > 1 else ''}prompt "
            f"{lens[0] if len(lens) == 1 else f'{lens[0]} to {lens[-1]}'} tokens, "
            f"encoded {gen.encoded}, generated {sum(gen.lengths)} | "
            f"prefill {1000 * gen.prefill_seconds:.1f} ms, decode {rate:.1f} tokens/s | "
            f"KV cache: decode {b['decode']:,} B, prefix {b['prefix']:,} B filled | held: "
            + ", ".join(f"{device} {n:,} B" for device, n in sorted(b["held"].items())))


# -----------------------------------------------------------------------------
# the memory a request needs, computed before anything is allocated

# The share of the memory free now that a request may take (--memory_limit_mb overrides it). The
# machine's memory is shared with every other process and the estimate leaves out the
# allocator's slack; a GPU's free memory is this device's alone. (Other devices: the CPU's.)
MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.8}


def cache_bytes(model, rows, prompt_len, new_tokens, element_size, span=False):
    """Bytes the KV cache of a one-turn request holds after its last decode step (DESIGN.md
    section 3), from the model's shape alone: for each layer cache the decode steps read (dec:
    one per K/V-projecting layer; bdd: each decoder layer's [cross | self] buffer; encdec: each
    decoder layer's self and cross K/V), its columns rounded up to the chunk it grows by, x rows
    x 2 (K and V) x n_kv_head x head size x element_size."""
    c = model.config
    cache = model.new_cache()  # empty: which layer caches there are and how each grows
    if cache.cross:  # encdec: the decoder starts at the last prompt token (span: [eot, sentinel])
        stream, source = (2 if span else 1) + new_tokens - 1, prompt_len + (1 if span else -1)
    else:
        stream, source = prompt_len + new_tokens - 1, 0
    columns = sum(math.ceil(stream / kv.chunk) * kv.chunk for kv in cache.layers) + \
        sum(math.ceil(source / kv.chunk) * kv.chunk for kv in cache.cross)
    return columns * rows * 2 * c.n_kv_head * (c.n_embd // c.n_head) * element_size


def request_bytes(model, prompt_lens, new_tokens, num_samples, element_size, span=False):
    """The memory one batch of a one-turn request needs at its peak, estimated: its KV cache
    after the last step (cache_bytes; rows: the prompts x num_samples, each as long as the
    longest) and which of its columns are real (a byte per row and column), plus a step's
    logits in float32 four times over (the copies sampling makes), plus the prefill's largest
    activations (per prompt, one layer's attention scores and MLP states in float32)."""
    c, P = model.config, max(prompt_lens)
    rows = len(prompt_lens) * num_samples
    valid = rows * (P + new_tokens + 1)
    logits = 4 * rows * c.vocab_size * 4
    prefill = len(prompt_lens) * P * (c.n_head * P + 8 * c.n_embd) * 4
    return cache_bytes(model, rows, P, new_tokens, element_size, span) + valid + logits + prefill


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


def check_memory(model, batches, args, device, span):
    """Refuse (ValueError, one line) a request whose largest batch of prompt ids would need more
    memory (request_bytes) than its limit: --memory_limit_mb, else MEMORY_SHARE of the memory
    free now on the device."""
    def need(batch):
        return request_bytes(model, [len(ids) for ids in batch], args.max_new_tokens,
                             args.num_samples, cfg.DTYPES[args.dtype].itemsize, span)
    batch = max(batches, key=need)
    if args.memory_limit_mb is not None:
        limit, what = args.memory_limit_mb * 1e6, "--memory_limit_mb"
    else:
        share, free = MEMORY_SHARE.get(device.type, MEMORY_SHARE["cpu"]), available_memory(device)
        limit = share * free
        what = f"{share:.0%} of the {in_words(free)} free on {device.type}; --memory_limit_mb " \
               f"sets another"
    if need(batch) > limit:
        rows = len(batch) * args.num_samples
        raise ValueError(f"this request needs about {in_words(need(batch))} ({rows:,} rows: "
                         f"{len(batch)} prompt(s) x --num_samples {args.num_samples}, of up to "
                         f"{max(map(len, batch)) + args.max_new_tokens - 1} positions: their "
                         f"KV cache, logits and prefill), over its limit of {in_words(limit)} "
                         f"({what}); lower --num_samples, --batch_size or --max_new_tokens")


def in_words(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


# flag: (allowed, what it must be)
FLAG_RULES = {
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "num_samples": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 1, "at least 1"),
    "memory_limit_mb": (lambda v: v is None or math.isfinite(v) and v > 0,
                        "a finite number above 0"),
}


def train_flag(name):
    """The help and range of train.py's flag of that name (TrainConfig's metadata)."""
    return cfg.TrainConfig.__dataclass_fields__[name].metadata


def parse_args(argv):
    p = cli.Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out_dir", default="out/bdd", help="folder with ckpt.pt from train.py")
    p.add_argument("--prompt", help="prompt text, or FILE:path to read it (default: a newline)")
    p.add_argument("--prompts", help="a file of prompts, one per line (empty lines refused), "
                   "generated in batches of --batch_size, printed in input order")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch with --prompts")
    p.add_argument("--num_samples", type=int, default=1, help="continuations per prompt, from "
                   "one prefill copied into each")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1, help="random seed of the sampling (allowed "
                   f"{train_flag('seed')['allowed']}, as in train.py)")
    p.add_argument("--threads", type=int, help=f"{train_flag('threads')['help']} (allowed "
                   f"{train_flag('threads')['allowed']})")
    p.add_argument("--memory_limit_mb", type=float, help="refuse a request whose estimated "
                   "memory (KV cache, logits, prefill) is larger (default: half the memory "
                   "available on the CPU, 80%% of the free GPU memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stats", action="store_true", help="print token counts, speed, cache bytes "
                   "and FLOPs per decoded token")
    p.add_argument("--chat", action="store_true", help="multi-turn: one user turn per stdin line")
    p.add_argument("--prefix_cache", default="keep", choices=PREFIX_POLICIES, help="--chat with "
                   "bdd: between turns keep the encoder's cache (the next turn encodes only its "
                   "new tokens), drop it (less memory; the next turn re-encodes the history) or "
                   "offload it to host memory (CUDA). One-turn generation always frees it")
    p.add_argument("--truncate", action="store_true", help="left-truncate a prompt (or chat "
                   "turn) that does not fit instead of refusing it")
    args = p.parse_args(argv)
    for name, (allowed, what) in FLAG_RULES.items():
        if not allowed(getattr(args, name)):
            cli.fail(f"--{name} must be {what}, got {getattr(args, name)}")
    for name in ("seed", "threads"):  # train.py's flags of the same name, the same ranges
        try:
            cfg.check_setting(name, getattr(args, name))
        except cfg.ConfigError as e:
            cli.fail(str(e))
    if args.chat and (args.prompts or args.num_samples > 1):
        cli.fail("--chat continues one conversation: drop --prompts and --num_samples")
    if args.prompts is not None and args.prompt is not None:
        cli.fail("give --prompt or --prompts, not both")
    if args.prefix_cache == "offload" and not (args.device.startswith("cuda")
                                               and torch.cuda.is_available()):
        cli.fail(f"--prefix_cache offload moves bdd's encoder cache from the GPU to host memory "
                 f"between turns: it needs CUDA (--device cuda), not --device {args.device}; "
                 f"use keep or drop")
    return args


def open_model(args):
    """(device, model, checkpoint, tokenizer), or a one-line error."""
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        cli.fail(f"device {args.device!r} is not usable here ({str(e).splitlines()[0]}); try --device cpu")
    try:
        model, ckpt = cfg.load_model(args.out_dir, device)
    except cli.BadInput as e:
        cli.fail(str(e))
    enc = get_tokenizer(ckpt["tokenizer"])
    return device, model, ckpt, enc


def main(argv=None):
    args = parse_args(argv)
    with cli.guard():  # Ctrl-C: every line printed so far is whole; nothing else is written
        sample(args)


def sample(args):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, model, ckpt, enc = open_model(args)
    span = ckpt["arch"] == "encdec" and ckpt.get("objective") == "span"
    span_args = dict(span_sentinel=enc.n_vocab, eot=enc.eot_token) if span else {}
    room = Session(model, **span_args).room()
    if args.chat and args.max_new_tokens > room:  # each turn's reply is cut to the room left
        cli.fail(f"--max_new_tokens {args.max_new_tokens} runs past the model's context "
                 f"(block_size {model.config.block_size}); use at most {room}")
    try:
        batches = [] if args.chat else prompt_batches(args, enc, model, room, device, span)
    except ValueError as e:
        cli.fail(str(e))
    torch.manual_seed(args.seed)
    ctx = (torch.autocast(device.type, dtype=getattr(torch, args.dtype))
           if args.dtype != "float32" else nullcontext())
    sampling = dict(temperature=args.temperature, top_k=args.top_k,
                    generator=torch.Generator(device=device).manual_seed(args.seed))
    print(f"{ckpt['arch']} model from {args.out_dir} (iter {ckpt.get('iter_num', '?')}, "
          f"{model.num_params() / 1e6:.2f}M non-embedding parameters, {ckpt['tokenizer']} tokens) "
          f"on {device}, {torch.get_num_threads()} thread(s)", file=sys.stderr)

    def text_of(tokens, n):
        ids = [t for t in tokens[:n].tolist() if t < enc.n_vocab and t != enc.eot_token]
        return enc.decode(ids)

    if args.chat:
        chat(Session(model, **span_args, prefix_cache=args.prefix_cache), enc, text_of, args,
             sampling, ctx)
    first = 1
    for batch in batches:
        label = "" if args.prompts is None else (
            f"[prompts {first}-{first + len(batch) - 1}] " if len(batch) > 1
            else f"[prompt {first}] ")
        generate_batch(model, batch, text_of, args, sampling, span_args, ctx, label)
        first += len(batch)


def prompt_batches(args, enc, model, room, device, span):
    """The prompts to generate from, [(text, ids)] in batches of --batch_size: each fitted into
    the context after --max_new_tokens (fit_prompts), the largest batch within the memory limit
    (check_memory). A prompt that cannot be is a ValueError."""
    read = [(where, text, enc.encode(text, disallowed_special=()))
            for where, text in read_prompts(args)]
    fitted = fit_prompts([(where, ids) for where, _, ids in read], args, room,
                         model.config.block_size)
    prompts = [(text, ids) for (_, text, _), ids in zip(read, fitted)]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    check_memory(model, [[ids for _, ids in batch] for batch in batches], args, device, span)
    return batches


def generate_batch(model, batch, text_of, args, sampling, span_args, ctx, label):
    """Generate for a batch of (text, ids) prompts, print each row after its prompt."""
    n = args.num_samples
    with ctx:
        gen = generate(model, [ids for _, ids in batch], args.max_new_tokens, **sampling,
                       **span_args, num_samples=n)
        # one more decode step, counted; it needs one more free position in the context
        longest = max(len(ids) for _, ids in batch)
        measurable = args.stats and longest + gen.tokens.shape[1] <= model.config.block_size
        flops = decode_flops(model, gen.tokens[:, -1], gen.cache) if measurable else None
    for row, (tokens, length) in enumerate(zip(gen.tokens, gen.lengths)):
        print(batch[row // n][0] + text_of(tokens, length))
        print("---------------", flush=True)
    if args.stats:
        print(label + format_stats(gen, [len(ids) for _, ids in batch]))
        if flops is None:
            print("FLOPs per decoded token: not counted, the context has no free position for one "
                  "more step (lower --max_new_tokens by one)")
        else:
            print(f"FLOPs per decoded token (batch {gen.tokens.shape[0]}): layers "
                  f"{flops['layers']:,}, LM head {flops['head']:,}")


def chat(session, enc, text_of, args, sampling, ctx):
    """One turn per stdin line. A turn whose reply does not fit in the context left gets a shorter
    one; a turn that does not fit at all ends the chat (exit 2, the lines after it unanswered).
    With --truncate, the conversation is cut to its last tokens instead (a new cache)."""
    print("chat: one turn per line; end with Ctrl-D", file=sys.stderr)
    for n_turn, line in enumerate(stdin_lines(), 1):
        ids = enc.encode(line if line.endswith("\n") else line + "\n", disallowed_special=())
        note = ""
        if len(ids) + args.max_new_tokens - 1 > session.room() and args.truncate:
            conversation = ([] if session.rows is None else session.rows[0].tolist()) + ids
            session = Session(session.model, session.span_sentinel, session.eot,
                              session.prefix_cache)
            ids = conversation[-(session.room() - args.max_new_tokens + 1):]
            note = f" (--truncate: the conversation cut to its last {len(ids)} tokens)"
        elif len(ids) > session.room():
            cli.fail(f"turn {n_turn} has {len(ids)} tokens but only {max(0, session.room())} "
                     f"positions are left in the context (block_size "
                     f"{session.model.config.block_size}); it and the lines after it were not "
                     f"answered: shorten it, or pass --truncate to cut the conversation")
        with ctx:
            gen = session.turn([ids], min(args.max_new_tokens, session.room() - len(ids) + 1),
                               stop_tokens=(enc.eot_token,), **sampling)
        print(text_of(gen.tokens[0], gen.lengths[0]), flush=True)
        if args.stats:
            print(f"[turn {n_turn}] " + format_stats(gen, [len(ids)]) + note, file=sys.stderr)


def stdin_lines():
    """stdin's lines, decoded as strict UTF-8 whatever the locale (a bad line: exit 2)."""
    if not hasattr(sys.stdin, "buffer"):  # a text stream put in its place
        yield from sys.stdin
        return
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            cli.fail(f"line {n} of stdin is not UTF-8 text ({e.reason} at byte {e.start}); it and "
                     f"the lines after it were not answered: --chat reads UTF-8 lines, one turn each")


if __name__ == "__main__":
    main()
