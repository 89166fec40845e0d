"""
Generate from a trained checkpoint: one prompt, a file of prompts in batches, or a chat.

    python sample.py --out_dir out/bdd --prompt "ROMEO:" --max_new_tokens 200 --stats
    python sample.py --out_dir out/bdd --prompts prompts.txt --batch_size 8 --num_samples 2
    printf 'To be\nor not\n' | python sample.py --out_dir out/bdd --chat --stats

The generation itself is generate.py's (KV caches, batches, sessions). Here: the flags (a
SampleConfig, checked when it is made), the prompts and how they fit the context, the memory a
request needs (computed from the model's shape before anything is allocated, and refused with one
line over its limit: --memory_limit_mb, by default half the memory available), --stats (tokens,
speed, every byte the cache holds, FLOPs per decoded token counted by torch's FlopCounterMode).
"""

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import cli
import config as cfg
from corpus.tokenizers import get_tokenizer
from generate import generate
from lab.flops import decode_flops
from model import DecoderOnly
from serve.cache import PREFIX_POLICIES, padded_batch
from serve.memory import available_memory, chat_bytes, nbytes, request_bytes
from serve.session import Session


# -----------------------------------------------------------------------------
# command line


def read_text(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise cfg.ConfigError(f"cannot read the {what} {path}: {e}") from None


def read_prompts(args):
    """[(where, text)] to generate from: --prompts FILE, one prompt per line (its newline not
    included; an empty line is refused), or the one --prompt (FILE:path reads it)."""
    if args.prompts is None:
        text = "\n" if args.prompt is None else args.prompt
        if text.startswith("FILE:"):
            path = text[len("FILE:"):]
            text = read_text(path, "prompt file")
            if not text:
                raise cfg.ConfigError(f"the prompt file {path} is empty; write the prompt in it")
        if not text:
            raise cfg.ConfigError("the prompt is empty; give some text with --prompt")
        return [("the prompt", text)]
    lines = read_text(args.prompts, "prompts file").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise cfg.ConfigError(f"the prompts file {args.prompts} is empty; write one prompt per line")
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise cfg.ConfigError(f"line {empty[0]} of {args.prompts} is empty ({len(empty)} empty lines in "
                         f"all); every line is a prompt: remove the empty ones")
    return [(f"line {i + 1} of {args.prompts}", line) for i, line in enumerate(lines)]


def fit_prompts(prompts, args, room, block_size):
    """[(where, ids)] -> [ids] that fit in the context with --max_new_tokens: each
    left-truncated with --truncate, else refused (ConfigError) naming the first that does not
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
        raise cfg.ConfigError(f"--max_new_tokens {new_tokens} runs past the model's context "
                         f"(block_size {block_size}); {advice}")
    return [fit_prompt(ids, room - new_tokens + 1, where, args, block_size)
            for where, ids in prompts]


def fit_prompt(ids, fit, where, args, block_size):
    """A prompt's token ids, left-truncated to `fit` with --truncate; refused without it."""
    if len(ids) <= fit:
        return ids
    if not args.truncate:
        raise cfg.ConfigError(f"{where} has {len(ids)} tokens but only {fit} fit with --max_new_tokens "
                         f"{args.max_new_tokens} in block_size {block_size}; shorten it, lower "
                         f"--max_new_tokens, or pass --truncate to keep its last {fit} tokens")
    return ids[-fit:]


def format_stats(prompt_lens, encoded, generated, timing, cache):
    """One line: the prompts, the columns the prefill encoded (dec: ran through all its layers),
    the tokens generated, the timing, and what the cache holds."""
    lens = sorted(set(prompt_lens))
    b = nbytes(cache)
    return (f"{f'{len(prompt_lens)} rows, ' if len(prompt_lens) > 1 else ''}prompt "
            f"{lens[0] if len(lens) == 1 else f'{lens[0]} to {lens[-1]}'} tokens, "
            f"encoded {encoded}, generated {generated} | {timing} | "
            f"KV cache: decode {b['decode']:,} B, prefix {b['prefix']:,} B filled | held: "
            + ", ".join(f"{device} {n:,} B" for device, n in sorted(b["held"].items())))


# -----------------------------------------------------------------------------
# the memory a request needs, computed before anything is allocated

# The share of the memory free now that a request may take (--memory_limit_mb overrides it). The
# machine's memory is shared with every other process and the estimate leaves out the
# allocator's slack; a GPU's free memory is this device's alone. (Other devices: the CPU's.)
MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.8}


def check_memory(need, what, args, device):
    """Refuse (ConfigError, one line) a request that would need `need` bytes (`what`: its rows
    and what they hold) over its limit: --memory_limit_mb, else MEMORY_SHARE of the memory free
    now on the device."""
    if args.memory_limit_mb is not None:
        limit, source = args.memory_limit_mb * 1e6, "--memory_limit_mb"
    else:
        share, free = MEMORY_SHARE.get(device.type, MEMORY_SHARE["cpu"]), available_memory(device)
        limit = share * free
        source = f"{share:.0%} of the {in_words(free)} free on {device.type}; --memory_limit_mb " \
                 f"sets another"
    cfg.refuse([(need > limit, f"this request needs about {in_words(need)} ({what}), over its "
                               f"limit of {in_words(limit)} ({source}); " + (
                                   "lower --max_new_tokens or --block_size" if args.chat else
                                   "lower --num_samples, --batch_size or --max_new_tokens"))])


def check_batches(model, batches, args, device, span):
    """check_memory of the largest batch of prompt ids, each prompt --num_samples rows."""
    def need(batch):
        return request_bytes(model, [len(ids) for ids in batch for _ in range(args.num_samples)],
                             args.max_new_tokens, cfg.DTYPES[args.dtype].itemsize, span)
    batch = max(batches, key=need)
    check_memory(need(batch), f"{len(batch) * args.num_samples:,} rows: {len(batch)} prompt(s) x "
                 f"--num_samples {args.num_samples}, of up to "
                 f"{max(map(len, batch)) + args.max_new_tokens - 1} positions: their KV cache, "
                 f"logits and prefill", args, device)


def in_words(nbytes):
    """Bytes in words to three figures at least: 43.2 GB, 8.8 MB, 12.5 kB, 300 B."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


@dataclass
class SampleConfig:
    """Every flag of sample.py, its help and what it allows as metadata (config.setting, as in
    TrainConfig): the parser is made from it, and a SampleConfig checks itself when it is made."""
    out_dir: str = cli.setting("out/bdd", "folder with ckpt.pt from train.py")
    prompt: str = cli.setting(None, "prompt text, or FILE:path to read it (default: a newline)")
    prompts: str = cli.setting(None, "a file of prompts, one per line (empty lines refused), "
                               "generated in batches of --batch_size, printed in input order")
    batch_size: int = cli.setting(None, "prompts per batch with --prompts (default 8)",
                                  "[1, inf)")
    num_samples: int = cli.setting(1, "continuations per prompt, each a row of the batch",
                                   "[1, inf)")
    max_new_tokens: int = cli.setting(200, "tokens generated per prompt (or chat turn)",
                                      "[1, inf)")
    temperature: float = cli.setting(0.8, "sampling temperature (0: greedy)", "[0, inf)")
    top_k: int = cli.setting(200, "sample among the k likeliest tokens", "[1, inf)")
    seed: int = cli.setting(1, "random seed of the sampling", cfg.allowed("seed"))
    threads: int = cli.setting(None, "torch's CPU threads (default: torch's own)",
                               cfg.allowed("threads"))
    memory_limit_mb: float = cli.setting(None, "refuse a request whose estimated memory (KV "
                                         "cache, logits, prefill) is larger (default: half the "
                                         "memory available on the CPU, 80%% of the free GPU "
                                         "memory)", "(0, inf)")
    device: str = cli.setting(None, "cpu, cuda or cuda:N (default: cuda if available)")
    dtype: str = cli.setting(None, "autocast dtype (default: bfloat16 on CUDA, else float32)",
                             tuple(cfg.DTYPES))
    stats: bool = cli.setting(False, "print token counts, speed, cache bytes and FLOPs per "
                              "decoded token")
    chat: bool = cli.setting(False, "multi-turn: one user turn per stdin line")
    prefix_cache: str = cli.setting("keep", "--chat with bdd: between turns keep the encoder's "
                                    "cache (the next turn encodes only its new tokens), drop it "
                                    "(less memory; the next turn re-encodes the history) or "
                                    "offload it to host memory (CUDA). One-turn generation "
                                    "always frees it", PREFIX_POLICIES)
    compile: bool = cli.setting(False, "compile the decode step (torch.compile; CUDA graphs on "
                                "CUDA) on a static cache (batches of prompts of one length; "
                                "others run eagerly)")
    truncate: bool = cli.setting(False, "left-truncate a prompt (or chat turn) that does not fit "
                                 "instead of refusing it")

    def __post_init__(self):
        cuda = torch.cuda.is_available()
        self.device = self.device or ("cuda" if cuda else "cpu")
        self.dtype = self.dtype or ("bfloat16" if cuda else "float32")
        cfg.check_fields(self)
        not_in_chat = [f"--{name}" for name, given in (
            ("prompt", self.prompt is not None), ("prompts", self.prompts is not None),
            ("batch_size", self.batch_size is not None), ("num_samples", self.num_samples > 1),
            ("compile", self.compile)) if given]
        cfg.refuse([
            (self.chat and not_in_chat, f"--chat reads one conversation's turns from stdin: "
                                        f"drop {', '.join(not_in_chat)}"),
            (self.prompts is not None and self.prompt is not None,
             "give --prompt or --prompts, not both"),
            (self.prefix_cache == "offload" and not (self.device.startswith("cuda") and cuda),
             f"--prefix_cache offload moves bdd's encoder cache from the GPU to host memory "
             f"between turns: it needs CUDA (--device cuda), not --device {self.device}; use keep "
             f"or drop")])
        cfg.check_device(self.device)
        self.batch_size = self.batch_size or 8


def parse_args(argv):
    p = cli.add_flags(cli.Parser(description=__doc__.split("\n\n")[0].strip()),
                      SampleConfig)
    return SampleConfig(**cli.given_flags(p.parse_args(argv), SampleConfig))


def open_model(args):
    """(device, model, checkpoint, tokenizer); ConfigError for a device or checkpoint that
    cannot be used."""
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise cfg.ConfigError(f"device {args.device!r} is not usable here "
                              f"({str(e).splitlines()[0]}); try --device cpu") from None
    model, ckpt = cfg.load_model(args.out_dir, device)
    return device, model, ckpt, get_tokenizer(ckpt["tokenizer"])


def main(argv=None):
    with cli.guard():  # Ctrl-C: every line printed so far is whole; nothing else is written
        sample(parse_args(argv))


def sample(args):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, model, ckpt, enc = open_model(args)
    span = ckpt["arch"] == "encdec" and ckpt.get("objective") == "span"
    span_args = dict(span_sentinel=enc.n_vocab, eot=enc.eot_token) if span else {}
    room = Session(model, **span_args).room()
    cfg.refuse([(args.chat and args.max_new_tokens > room,  # each reply is cut to the room left
                 f"--max_new_tokens {args.max_new_tokens} runs past the model's context "
                 f"(block_size {model.config.block_size}); use at most {room}")])
    if args.chat:  # one row, its caches at most the context's
        check_memory(chat_bytes(model, cfg.DTYPES[args.dtype].itemsize), "a conversation of "
                     f"up to {model.config.block_size} positions: its caches, logits and a "
                     f"prefill", args, device)
    batches = [] if args.chat else prompt_batches(args, enc, model, room, device, span)
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
    (check_memory). A prompt that cannot be is a ConfigError."""
    read = [(where, text, enc.encode(text, disallowed_special=()))
            for where, text in read_prompts(args)]
    fitted = fit_prompts([(where, ids) for where, _, ids in read], args, room,
                         model.config.block_size)
    prompts = [(text, ids) for (_, text, _), ids in zip(read, fitted)]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    check_batches(model, [[ids for _, ids in batch] for batch in batches], args, device, span)
    return batches


def generate_batch(model, batch, text_of, args, sampling, span_args, ctx, label):
    """Generate for a batch of (text, ids) prompts, each --num_samples times (a row each), and
    print each row after its prompt. Rows of different lengths are left-padded (serve/cache.py);
    span-corruption checkpoints are generated T5-style (serve.Session)."""
    n, device = args.num_samples, next(model.parameters()).device
    rows = [torch.tensor(ids, device=device) for _, ids in batch for _ in range(n)]
    t0 = time.perf_counter()
    with ctx:
        if span_args:
            gen = Session(model, **span_args).turn(rows, args.max_new_tokens, **sampling,
                                                   last=True)
            tokens, cache, row_lengths = gen.tokens, gen.cache, gen.lengths
        else:
            padded = len({len(r) for r in rows}) > 1  # a compiled step needs one length
            idx, cache = padded_batch(model, rows) if padded else \
                (torch.stack(rows), model.new_cache())
            tokens = generate(model, idx, args.max_new_tokens, **sampling, cache=cache,
                              compile=args.compile and not padded)
            row_lengths = [tokens.shape[1]] * len(rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        # one more decode step, counted; it needs one more free position in the context
        longest = max(len(r) for r in rows)
        measurable = args.stats and not args.compile and \
            longest + tokens.shape[1] <= model.config.block_size
        flops = decode_flops(model, tokens[:, -1:], getattr(cache, "decoder", cache)) \
            if measurable else None
    for row, (new, length) in enumerate(zip(tokens, row_lengths)):
        print(batch[row // n][0] + text_of(new, length))
        print("---------------", flush=True)
    if args.stats:
        generated, longest = sum(row_lengths), max(len(r) for r in rows)
        # dec runs the whole prompt through its layers; bdd and encdec encode all but its last
        encoded = gen.encoded if span_args else longest - (not isinstance(model, DecoderOnly))
        stats = format_stats([len(r) for r in rows], encoded, generated,
                             f"{1000 * seconds:.1f} ms, {generated / seconds:.1f} tokens/s "
                             f"(prefill included)", cache)
        print(label + stats + (" (the prefill's; the compiled steps' static cache holds the "
                               "whole context)" if args.compile else ""))
        if flops is None:
            print("FLOPs per decoded token: not counted (--compile, or the context has no free "
                  "position for one more step: lower --max_new_tokens by one)")
        else:
            print(f"FLOPs per decoded token (batch {tokens.shape[0]}): layers "
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
        cfg.refuse([(len(ids) > session.room(), f"turn {n_turn} has {len(ids)} tokens but only "
                     f"{max(0, session.room())} positions are left in the context (block_size "
                     f"{session.model.config.block_size}); it and the lines after it were not "
                     f"answered: shorten it, or pass --truncate to cut the conversation")])
        reply = min(args.max_new_tokens, session.room() - len(ids) + 1)
        with ctx:
            gen = session.turn([ids], reply, stop_tokens=(enc.eot_token,), **sampling)
        print(text_of(gen.tokens[0], gen.lengths[0]), flush=True)
        if reply < args.max_new_tokens:
            print(f"note: turn {n_turn}'s reply was cut to {reply} tokens, the room left in the "
                  f"context (block_size {session.model.config.block_size}); --truncate keeps the "
                  f"conversation's last tokens instead", file=sys.stderr)
        if args.stats:
            decoded, seconds = gen.lengths[0] - 1, gen.decode_seconds
            rate = decoded / seconds if decoded and seconds > 0 else float("nan")
            timing = f"prefill {1000 * gen.prefill_seconds:.1f} ms, decode {rate:.1f} tokens/s"
            print(f"[turn {n_turn}] " + format_stats([len(ids)], gen.encoded, gen.lengths[0],
                                                     timing, gen.cache) + note, file=sys.stderr)


def stdin_lines():
    """stdin's lines, decoded as strict UTF-8 whatever the locale (a bad line: exit 2)."""
    if not hasattr(sys.stdin, "buffer"):  # a text stream put in its place
        yield from sys.stdin
        return
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise cfg.ConfigError(f"line {n} of stdin is not UTF-8 text ({e.reason} at byte "
                                  f"{e.start}); it and the lines after it were not answered: "
                                  f"--chat reads UTF-8 lines, one turn each") from None


if __name__ == "__main__":
    main()
