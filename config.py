"""
The configuration of a nanoBDD run, in one place:

- TrainConfig: every setting of a run. Each field carries its --help text and what it allows
  (an interval such as "[0, 1)", or a tuple of choices) as metadata: train.py's flags and the
  checks are made from them, and a TrainConfig checks itself when it is made;
- AGREE: how fields must agree with each other, checked after each field on its own;
- PRESETS: the cpu and gpu recipes that train.py, compare.py and lab/sweep.py all start from;
- model_config(): the model's shape from a run's config, and fresh_model();
- checkpoints: save, load (one reader, with every check), the model of a checkpoint, and the
  checks a resumed run must pass.

This is the boundary where input is validated, once: everything below (model, pack, corpus)
trusts the values it gets. A bad value raises ConfigError (cli.BadInput: one line, exit 2).
"""

import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch

import cli
import files
from cli import setting
import pack
from corpus.download import DATA, DataError
from corpus.tokenizers import TOKENIZERS, check_tokenizer
from corpus.turns import turn_pattern
from lab import convert
from model import ARCHS, ModelConfig, build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(cli.BadInput):
    """A bad setting, device, folder or checkpoint; the message says what is wrong and what to do."""


M = ModelConfig  # the model's fields' defaults, below


@dataclass
class TrainConfig:
    # what to train
    arch: str = setting("bdd", "architecture", ARCHS)
    objective: str = setting("prefix_lm", "encdec pretraining objective (dec and bdd predict "
                             "every next token)", pack.OBJECTIVES)
    max_blocks: int = setting(8, "bdd: up to max_blocks - 1 random block boundaries per layout",
                              "[2, inf)")
    block_layouts: int = setting(4, "bdd: random block layouts per batch, each shared by an equal "
                                 "group of its rows (batch_size: one per row)", "[1, inf)")
    boundaries: str = setting("random", "bdd: where blocks start: random (uniform), logspace "
                              "(log-uniform block lengths), single (one boundary), turns (at each "
                              "turn start in the text, else random)", pack.BOUNDARIES)
    # data and output
    data: str = setting(None, "text or jsonl file, folder of .txt/.jsonl files, glob, or nanoGPT "
                        "folder with train.bin and val.bin (default: Shakespeare)")
    data_root: str = setting(None, "folder of prepared datasets (default: data/)")
    tokenizer: str = setting("byte", "tokenizer", TOKENIZERS)
    text_field: str = setting("text", "the text field of jsonl lines")
    turn_regex: str = setting(None, "a regular expression whose matches start the turns of the "
                              "text (default: the speaker lines of the Shakespeare plays; none "
                              "for other corpora)")
    rehash: bool = setting(False, "re-read the whole source (not only file names, sizes and "
                           "times) to decide whether its prepared copy is current")
    out_dir: str = setting(None, "checkpoint and log folder (default: out/<arch>)")
    init_from: str = setting("scratch", "scratch; resume <out_dir>/ckpt.pt (unset flags come "
                             "from it); or another run's folder: fine-tune from its weights (a "
                             "fresh optimizer and schedule; this run's flags, with its shape); "
                             "a dec run's folder with --arch bdd, --n_kv_head or --kv_share: "
                             "convert it into that variant, then uptrain")
    decoder_init: str = setting(None, "bdd converted from a dec run: its decoder layers start as "
                                "the dec's top layers, its bottom ones, or fresh (default top)",
                                convert.DECODER_INITS)
    overwrite: bool = setting(False, "let a fresh run replace the run already in --out_dir")
    always_save_checkpoint: bool = setting(False, "save at every evaluation, not only when the "
                                           "continuation loss improves")
    # the model's shape: model.ModelConfig's fields and defaults, with their help and range
    n_layer: int = setting(M.n_layer, "total layers (encdec and bdd: encoder + decoder)",
                           "[2, inf)")
    n_dec_layer: int = setting(M.n_dec_layer, "decoder layers of encdec and bdd (default: "
                               "n_layer // 3, the paper's 2:1 split)", "[1, inf)")
    n_head: int = setting(M.n_head, "attention heads", "[1, inf)")
    n_kv_head: int = setting(M.n_kv_head, "key/value heads, a divisor of n_head (grouped-query "
                             "attention; 1: multi-query; default: n_head)", "[1, inf)")
    kv_share: int = setting(M.kv_share, "dec: each group of kv_share consecutive layers attends "
                            "to its first layer's keys and values (cross-layer attention)",
                            "[1, inf)")
    n_embd: int = setting(M.n_embd, "width", "[2, inf)")
    block_size: int = setting(M.block_size, "tokens per row (the context)", "[2, inf)")
    dropout: float = setting(M.dropout, "dropout", "[0, 1)")
    bias: bool = setting(M.bias, "biases in Linear layers")
    # optimisation: AdamW, linear warmup, cosine decay to min_lr at lr_decay_iters
    batch_size: int = setting(16, "rows per micro-step and process", "[1, inf)")
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step, on each "
                                               "process", "[1, inf)")
    max_iters: int = setting(300, "optimizer steps", "[0, inf)")
    learning_rate: float = setting(1e-3, "peak learning rate", "(0, inf)")
    min_lr: float = setting(1e-4, "final learning rate", "[0, inf)")
    warmup_iters: int = setting(30, "linear warmup steps (unset: scaled down with a shorter "
                                "--max_iters or --lr_decay_iters)", "[0, inf)")
    lr_decay_iters: int = setting(None, "step where the cosine reaches min_lr (default: "
                                  "max_iters, also a resumed run's new max_iters)", "[0, inf)")
    weight_decay: float = setting(0.1, "AdamW weight decay of matrices", "[0, inf)")
    beta1: float = setting(0.9, "AdamW beta1", "[0, 1)")
    beta2: float = setting(0.99, "AdamW beta2 (0.99 for small batches of tokens)", "[0, 1)")
    grad_clip: float = setting(1.0, "clip the gradient norm (0: off)", "[0, inf)")
    # evaluation and logging
    eval_interval: int = setting(50, "evaluate every this many steps (unset: scaled down with a "
                                 "shorter --max_iters)", "[1, inf)")
    eval_iters: int = setting(4, "batches per evaluation set", "[1, inf)")
    log_interval: int = setting(10, "log every this many steps (unset: scaled down with a "
                                "shorter --max_iters)", "[1, inf)")
    # system
    preset: str = setting(None, "the recipe unset flags come from (default: gpu on a CUDA "
                          "machine, else cpu)", ("cpu", "gpu"))
    device: str = setting("cpu", "cpu, cuda or cuda:N (default: cuda if available)")
    dtype: str = setting("float32", "autocast dtype of the forward", tuple(DTYPES))
    compile: bool = setting(False, "torch.compile the model")
    flex: bool = setting(False, "FlexAttention block masks for bdd's decoder and encdec's "
                         "padded source (CUDA; elsewhere the dense masks, the same function; "
                         "causal attention takes SDPA's causal kernel either way)")
    seed: int = setting(1337, "random seed (rank r uses seed + r)", "[0, 1e18]")
    threads: int = setting(None, "CPU threads torch computes with (default: one per core idle "
                           "as the run starts; a resumed run's own; OMP_NUM_THREADS if set)",
                           "[1, 1024]")

    # What make_config scaled to the run's length (fit_to_length), in words; None: nothing.
    adapted: ClassVar[str] = None

    def __post_init__(self):
        if self.out_dir is None:
            self.out_dir = os.path.join("out", self.arch)
        check(self)

    @property
    def n_dec(self):
        """Decoder layers of encdec and bdd (the 2:1 split unless n_dec_layer is set)."""
        return model_config(self, vocab_size=1).n_dec_layer


# The recipes. cpu is TrainConfig's defaults as they stand (a 6-layer model of width 128 on byte
# Shakespeare: 300 steps of 16 x 256 tokens, about 1.5 minutes per arch on 2 cores). gpu is a
# GPT-2-small-width run for one GPU: 16 x 1024 tokens x 2 micro-steps = 32k tokens per step,
# 600 steps = 14 passes over Shakespeare's 1.4M gpt2 tokens, so dropout against overfitting.
PRESETS = {
    "cpu": {},
    "gpu": dict(device="cuda", tokenizer="gpt2", n_layer=12, n_head=12, n_embd=768,
                block_size=1024, dropout=0.1, gradient_accumulation_steps=2, max_iters=600,
                learning_rate=6e-4, min_lr=6e-5, warmup_iters=60, beta2=0.95, eval_interval=100,
                eval_iters=8, log_interval=25, dtype="bfloat16", compile=True, flex=True),
}

# What a resumed run keeps of the machine it runs on rather than of the checkpoint.
MACHINE_FIELDS = ("device", "dtype", "compile", "flex", "threads", "init_from", "out_dir",
                  "overwrite", "rehash", "preset")
# Checkpoint and run must agree on these, or the weights do not fit the model: every field of
# model.ModelConfig but dropout and flex (how it trains, not its weights).
SHAPE_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("dropout", "flex"))
CHECKPOINT_KEYS = ("model", "optimizer", "arch", "model_config", "tokenizer", "objective",
                   "train_config", "iter_num", "best_cont_loss", "history", "rng")
PATH_FIELDS = ("data", "data_root", "out_dir", "init_from")  # where "" would mean this folder
INIT_KEYWORDS = ("scratch", "resume")  # any other --init_from names the folder of a run


def decay_end(c):
    return c.max_iters if c.lr_decay_iters is None else c.lr_decay_iters


def init_source(c):
    """The checkpoint a fine-tune starts from (--init_from naming a run's folder), else None."""
    return None if c.init_from in INIT_KEYWORDS else checkpoint_path(c.init_from)


# How fields must agree: (holds for config c, the message when it does not).
AGREE = [
    (lambda c: c.objective == "prefix_lm" or c.arch == "encdec",
     "--objective {objective} is an encoder-decoder objective; {arch} always predicts every next "
     "token: drop --objective or use --arch encdec"),
    (lambda c: c.objective != "span" or c.block_size >= 3,
     "--objective span needs --block_size 3 or more (its decoder reads a sentinel, the masked "
     "tokens and an end token, within the row); raise --block_size"),
    (lambda c: c.boundaries == "random" or c.arch == "bdd",
     "--boundaries {boundaries} places bdd's block boundaries; {arch} has none: drop "
     "--boundaries or use --arch bdd"),
    (lambda c: c.n_dec_layer is None or c.n_dec_layer < c.n_layer,
     "--n_dec_layer {n_dec_layer} must be smaller than --n_layer {n_layer} (the encoder gets the "
     "other layers); lower --n_dec_layer or raise --n_layer"),
    (lambda c: c.n_embd % c.n_head == 0 and c.n_embd // c.n_head % 2 == 0,
     "--n_embd {n_embd} must split into --n_head {n_head} heads of an even size (RoPE rotates "
     "pairs); e.g. --n_embd {even_width}"),
    (lambda c: c.n_kv_head is None or c.n_head % c.n_kv_head == 0,
     "--n_kv_head {n_kv_head} must divide --n_head {n_head} (each key/value head serves an equal "
     "group of query heads)"),
    (lambda c: c.kv_share == 1 or c.arch == "dec",
     "--kv_share is cross-layer K/V sharing of dec's layers; {arch} keeps one K/V per layer: drop "
     "--kv_share or use --arch dec"),
    (lambda c: init_source(c) is None or
     os.path.realpath(c.init_from) != os.path.realpath(c.out_dir),
     "--init_from {init_from} is this run's own --out_dir: a fine-tune trains into a folder of its "
     "own and leaves its source as it is; continue a run with --init_from resume"),
    (lambda c: c.decoder_init is None or (c.arch == "bdd" and c.init_from != "scratch"),
     "--decoder_init {decoder_init} chooses the decoder layers of a bdd converted from a dec run; "
     "give it with --arch bdd --init_from <a dec run's folder>, or drop it"),
    (lambda c: c.kv_share <= c.n_layer,
     "--kv_share {kv_share} groups more layers than the model has (--n_layer {n_layer})"),
    (lambda c: c.min_lr <= c.learning_rate,
     "--min_lr {min_lr:g} is above --learning_rate {learning_rate:g}: the schedule would rise; "
     "lower --min_lr"),
    (lambda c: c.max_iters == 0 or c.warmup_iters <= c.max_iters,
     "--warmup_iters {warmup_iters} is longer than the run (--max_iters {max_iters}); lower "
     "--warmup_iters"),
    (lambda c: c.lr_decay_iters is None or c.lr_decay_iters >= c.warmup_iters,
     "--lr_decay_iters {lr_decay_iters} ends the decay before the warmup ends (--warmup_iters "
     "{warmup_iters}); raise --lr_decay_iters or leave it out"),
]


def check(config):
    """Raise ConfigError for the first setting that cannot work: each field against what it
    allows, the fields against each other (AGREE), then the device."""
    check_fields(config)
    for holds, message in AGREE:
        if not holds(config):
            raise ConfigError(message.format(**asdict(config), even_width=64 * config.n_head))
    if config.turn_regex is not None:
        turn_pattern(config.turn_regex)  # DataError: one line, exit 2
    check_device(config.device)


def refuse(problems):
    cli.refuse(problems, ConfigError)


def check_fields(obj):
    """Raise ConfigError for the first field of a dataclass of settings (TrainConfig, sample.py's
    SampleConfig) whose value its metadata does not allow."""
    for f in fields(obj):
        value, allowed = getattr(obj, f.name), f.metadata["allowed"]
        interval = allowed if isinstance(allowed, str) and value is not None else None
        too_long = f.name in PATH_FIELDS and value and files.name_too_long(value)
        refuse([(value == "" and f.name in PATH_FIELDS, f"--{f.name} is empty; give a path, or "
                                                        f"leave --{f.name} out for its default"),
                (too_long, f"--{f.name} {cli.shown(value)}: {too_long}; give a shorter path"),
                (isinstance(allowed, tuple) and value is not None and value not in allowed,
                 f"--{f.name} {value!r} is unknown; choose one of {', '.join(allowed or ())}"),
                (interval and not cli.in_interval(value, interval), f"--{f.name} {value} is out of "
                 f"range: it must be {interval and cli.describe_interval(interval)}")])


def allowed(name):
    """What TrainConfig's field `name` allows (sample.py shares --seed's and --threads')."""
    return TrainConfig.__dataclass_fields__[name].metadata["allowed"]


def check_device(device):
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        kind = index = None
    n = torch.cuda.device_count()
    refuse([(kind is None, f"--device {device!r} is not a device torch knows; use cpu, cuda or "
                           f"cuda:N"),
            (kind not in ("cpu", "cuda"), f"--device {device}: only cpu and cuda are supported"),
            (kind == "cuda" and n == 0, f"--device {device}: no CUDA GPU is available here; use "
                                        f"--device cpu"),
            (kind == "cuda" and (index or 0) >= max(n, 1), f"--device {device}: this machine has "
                                                           f"{n} GPU(s); use cuda:0 to cuda:{n - 1}")])


def check_folders(config):
    """Before any data is prepared or model built: out_dir and data_root must be folders this
    process can write (or create), and a fresh run must not silently replace another run."""
    files.usable_folder(config.out_dir, "out_dir")
    files.usable_folder(config.data_root or DATA, "data_root")
    path = checkpoint_path(config.out_dir)
    refuse([(config.init_from != "resume" and not config.overwrite and path.exists(),
             f"{path} already holds a run: continue it with --init_from resume, train into "
             f"another --out_dir, or replace it with --overwrite")])


# -----------------------------------------------------------------------------
# making a config: defaults < preset < checkpoint (resume) < the flags given


def make_config(recipe=None, **flags):
    """TrainConfig from the fields a user set (flags). Every other field comes from the preset
    (given, or gpu when the device is a CUDA GPU, else cpu), then an experiment's recipe (its own
    defaults, such as a shorter run), and, with init_from="resume", from the run being resumed
    (so `--init_from resume --max_iters 800` continues a run without repeating its flags).
    Defaults made for the preset's or recipe's length fit a shorter run (fit_to_length)."""
    cuda = torch.cuda.is_available()
    device = flags.get("device") or ("cuda" if cuda else "cpu")
    preset = flags.get("preset") or ("gpu" if device.startswith("cuda") else "cpu")
    values = {**{f.name: f.default for f in fields(TrainConfig)}, **PRESETS[preset],
              **(recipe or {}), "preset": preset}
    if values.get("dtype") == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        values["dtype"] = "float16"
    made_for = values["max_iters"]
    if flags.get("init_from") == "resume":  # the checkpoint's values, as they were
        path = checkpoint_path(flags.get("out_dir") or default_out_dir(flags))
        saved = load_checkpoint(path, mmap=True)["train_config"]
        known = {f.name for f in fields(TrainConfig)}
        values.update({k: v for k, v in saved.items() if k in known and k not in MACHINE_FIELDS})
    values.update(flags)
    adapted = None if flags.get("init_from") == "resume" else fit_to_length(values, flags, made_for)
    config = TrainConfig(**values)
    config.adapted = adapted
    return config


# Settings whose defaults are made for the preset's (or a recipe's) number of steps, and how each
# scales: a tenth of the run warms up, about six evaluations and thirty log lines.
FOLLOW_LENGTH = {"warmup_iters": math.floor, "eval_interval": math.ceil, "log_interval": math.ceil}


def fit_to_length(values, given, made_for):
    """Scale the FOLLOW_LENGTH fields the user did not give (not in `given`) to a run shorter
    than the `made_for` steps their defaults were made for, in place: a quick try (--max_iters 20)
    warms up, evaluates and logs in proportion instead of being refused. The warmup also fits a
    given --lr_decay_iters. Returns a line saying what changed, or None."""
    changed, decay = [], values["lr_decay_iters"]
    for name, rounding in FOLLOW_LENGTH.items():
        length = values["max_iters"]
        if name == "warmup_iters" and decay is not None:
            length = min(length, decay)
        if name in given or length >= made_for:
            continue
        fitted = max(rounding(values[name] * length / made_for), name != "warmup_iters")
        if fitted < values[name]:
            changed.append(f"{name} {fitted} (not {values[name]})")
            values[name] = fitted
    decays = "" if decay is None or decay >= values["max_iters"] else f", decaying in {decay}"
    return (f"defaults fitted to this run of {values['max_iters']} steps{decays} (they are made "
            f"for {made_for}): {', '.join(changed)}; set them to choose") if changed else None


def default_out_dir(flags):
    return os.path.join("out", flags.get("arch", TrainConfig.arch))


def add_flags(parser, per_run=None, skip=()):
    """train.py's flags, one per TrainConfig field (cli.add_flags), the gpu preset's values in
    their help."""
    gpu = {name: f"gpu preset {value}" for name, value in PRESETS["gpu"].items()}
    return cli.add_flags(parser, TrainConfig, per_run, skip, notes=gpu)


def given_flags(args):
    return cli.given_flags(args, TrainConfig)


# -----------------------------------------------------------------------------
# the model of a config


def model_config(config, vocab_size=None):
    """The model's shape. FlexAttention has no CPU backward, so off CUDA --flex falls back to the
    dense masks: the same function (tested), only slower on a GPU."""
    if vocab_size is None:
        vocab_size = pack.vocab_size(config.tokenizer, config.objective)
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS if name != "vocab_size"}
    return ModelConfig(**shape, vocab_size=vocab_size, dropout=config.dropout,
                       flex=config.flex and torch.device(config.device).type == "cuda")


def autocast(config):
    """The forward's mixed-precision context: nothing in float32."""
    if config.dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=DTYPES[config.dtype])


def fresh_model(config, device=None, seed=None):
    """The freshly initialised model a run with this config starts from (seed: config.seed)."""
    torch.manual_seed(config.seed if seed is None else seed)
    return build_model(config.arch, model_config(config)).to(device or config.device)


# -----------------------------------------------------------------------------
# checkpoints


def checkpoint_path(out_dir):
    return Path(out_dir) / "ckpt.pt"


def save_checkpoint(path, state):
    """Written whole (files.written_whole: on the disk before the rename), so a crash, a kill
    or a full disk at any moment leaves the previous checkpoint whole."""
    with files.written_whole(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's writer reports a short write as a RuntimeError
            raise OSError(str(e).splitlines()[0]) from None


def load_checkpoint(path, mmap=False):
    """The checkpoint dict of path (on the CPU), or ConfigError saying why it cannot be one."""
    path, ckpt, size = Path(path), None, None
    if path.is_file():
        size = path.stat().st_size
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # truncated or foreign files fail in many ways inside torch.load
            pass
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else []
    unread = "it is empty" if size == 0 else f"torch.load cannot read its {size or 0:,} bytes"
    refuse([(path.is_dir(), f"{path} is a folder, not a checkpoint file; remove it, or point "
                            f"--out_dir at a run's folder"),
            (size is None, f"no checkpoint at {path}; train one first (python train.py "
                           f"--out_dir {path.parent}) or point --out_dir at a run's folder"),
            (ckpt is None, f"{path} is not a readable checkpoint: {unread}, so it was cut short "
                           f"or not written by train.py; delete it, or use another --out_dir"),
            (not isinstance(ckpt, dict), f"{path} holds a {type(ckpt).__name__}, not a train.py "
                                         f"checkpoint; delete it, or use another --out_dir"),
            (missing, f"{path} lacks the keys {', '.join(missing)} of a train.py checkpoint (an "
                      f"older nanoBDD, or another program); retrain it, or use another --out_dir")])
    return ckpt


def load_model(out_dir, device="cpu"):
    """(model in eval mode, checkpoint dict without weights and optimizer) of out_dir/ckpt.pt."""
    ckpt = load_checkpoint(checkpoint_path(out_dir))
    try:
        check_tokenizer(ckpt["tokenizer"])
    except DataError as e:
        raise ConfigError(f"{out_dir}: {e}") from None
    try:
        model = build_model(ckpt["arch"], ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt.pop("model"))
    except (TypeError, KeyError, ValueError, RuntimeError) as e:  # another version's shapes
        raise ConfigError(f"{out_dir}/ckpt.pt does not fit this nanoBDD's models "
                          f"({str(e).splitlines()[0]}); retrain it") from None
    ckpt.pop("optimizer")
    return model.to(device).eval(), ckpt


def starting_checkpoint(config):
    """The checkpoint a run starts from: its own (init_from resume), checked to be resumable; a
    fine-tune's source (init_from a run's folder), checked to fit; None from scratch."""
    if config.init_from == "resume":
        path = checkpoint_path(config.out_dir)
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, config, path)
        return ckpt
    return None if init_source(config) is None else load_source(config)


def load_source(config):
    """The checkpoint a fine-tune starts from, checked to fit this run's model. Only its weights
    are used: the optimizer's moments belong to the source's schedule and data, and the fine-tune
    warms up its own (AdamW re-estimates them during the warmup)."""
    path = init_source(config)
    if not path.exists():
        raise ConfigError(f"--init_from {config.init_from}: there is no checkpoint at {path}; "
                              f"give scratch, resume, or the folder of a trained run to fine-tune "
                              f"from")
    ckpt = load_checkpoint(path)
    target = asdict(model_config(config))
    if convert.converts(ckpt["arch"], ckpt["model_config"], config.arch, target):
        return converted(ckpt, config, path, target)
    check_fits(ckpt, config, path, "give this run the same shape (a fine-tune takes its "
                   "flags from the command, not from its source)",
                   f"give --arch {ckpt['arch']} (a fine-tune keeps its source's model)")
    refuse([(config.decoder_init is not None, f"--decoder_init: {path} holds a bdd model "
                                              f"already, whose decoder a fine-tune keeps; drop "
                                              f"--decoder_init")])
    return ckpt


def converted(ckpt, config, path, target):
    """The source checkpoint with its weights converted into this run's variant (lab/convert.py),
    and ckpt["conversion"] saying how; ConfigError if no conversion is defined or the shape,
    tokenizer or context differ (a conversion changes only the keys and values)."""
    refuse(convert.problems(ckpt["arch"], ckpt["model_config"], config.arch, target, path))
    check_fits(ckpt, config, path, "a conversion keeps its parent's shape: give the same flags",
               None, fields=convert.KEPT_FIELDS)
    fresh = fresh_model(config, "cpu").state_dict()
    ckpt["model"], ckpt["conversion"] = convert.convert(
        ckpt["model"], ckpt["model_config"], config.arch, target, fresh,
        config.decoder_init or "top")
    return ckpt


def check_resumable(ckpt, config, path):
    """Refuse to load weights into a model of another arch or shape, or to stop a run before
    the iteration its checkpoint has reached."""
    check_fits(ckpt, config, path, "drop those flags to resume it, or train this shape in "
               "another --out_dir", f"use --arch {ckpt['arch']}, or another --out_dir")
    converted_with = ckpt["train_config"].get("decoder_init")
    refuse([(ckpt["iter_num"] > config.max_iters,
             f"{path} is at iteration {ckpt['iter_num']}, past --max_iters {config.max_iters}; "
             f"resume with --max_iters {ckpt['iter_num']} or more (or leave it out)"),
            (config.decoder_init != converted_with,
             f"--decoder_init {config.decoder_init}: {path} was "
             + (f"converted with --decoder_init {converted_with}" if converted_with else
                "not converted from a dec run") + "; a resumed run keeps its weights: drop "
             "--decoder_init")])


def check_fits(ckpt, config, path, advice, arch_advice, fields=SHAPE_FIELDS):
    """Refuse to load a checkpoint's weights into a model of another arch (arch_advice None: a
    conversion, which may change it) or shape (the fields compared; the advice says what to
    do)."""
    saved = {**ckpt["model_config"], "tokenizer": ckpt["tokenizer"], "objective": ckpt["objective"]}
    wanted = {**asdict(model_config(config)), "tokenizer": config.tokenizer,
              "objective": config.objective}
    differ = ", ".join(f"{k} {saved.get(k)} (this run: {wanted[k]})"
                       for k in ("tokenizer", "objective") + fields if saved.get(k) != wanted[k])
    refuse([(arch_advice is not None and ckpt["arch"] != config.arch,
             f"{path} holds a {ckpt['arch']} model, not {config.arch}; {arch_advice}"),
            (differ, f"{path} was trained with {differ}; {advice}")])


def rng_state(gen):
    """The random generators a resumed run needs: torch's (CPU and CUDA) and the batches' gen."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "batches": gen.get_state()}


def set_rng_state(rng, gen):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    gen.set_state(rng["batches"])
