"""KV-cached inference: cached logits equal the training forward's, multi-turn sessions equal one
forward over the whole conversation, cache bytes follow DESIGN.md section 3, the CLI is safe."""

import io
import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from conftest import default_sigint, user_visible_warnings

from mask import block_ids
from model import ARCHS, ModelConfig, build_model
from pack import N_SENTINELS
from lab.measure import ForcedSession, measure_decode
import sample
from generate import generate
from sample import main
from serve.memory import nbytes
from serve.session import Session
from test_model import OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 41


def tiny(rng=None, **kw):
    rng = rng or random.Random(0)
    n_layer = rng.choice([2, 3, 4, 6])
    cfg = dict(vocab_size=V, block_size=40, n_layer=n_layer,
               n_dec_layer=rng.randint(1, n_layer - 1), n_head=rng.choice([1, 2, 4]), n_embd=16)
    return ModelConfig(**{**cfg, **kw})


def forward_logits(arch, model, full, turn_starts):
    """Training-forward logits (B, n, V) predicting full[:, 1:] ... at the positions a session
    decodes, for a conversation whose turns' last prompt tokens sit at `turn_starts`, plus the
    first position each covers. dec: the causal row; bdd: block boundaries at the turn starts;
    encdec: per turn, the source is everything before the turn start."""
    T = full.shape[1]
    if arch == "dec":
        return model({"x": full})[0]
    if arch == "bdd":
        return model({"x": full, "block_ids": block_ids(T, [s for s in turn_starts if s > 0])})[0]
    ends = turn_starts[1:] + [T]
    parts = [model({"enc_x": full[:, :s], "dec_x": full[:, s:e]})[0]
             for s, e in zip(turn_starts, ends)]
    before = torch.zeros(full.shape[0], turn_starts[0], V, dtype=parts[0].dtype, device=full.device)
    return torch.cat([before, *parts], dim=1)


def run_session(model, full, turns, prefix_cache="keep"):
    """Teacher-forced session over `full` (B, T) (lab.measure.ForcedSession, the code path of
    --chat): turns = [(prompt_len, decoded_len), ...]; each turn's reply is the decoded tokens
    and one more, fed with the next turn's prompt. Returns logits (B, T, V) at every position the
    session predicted from (zeros elsewhere), the turn starts and the session's cache."""
    B, T = full.shape
    out = torch.zeros(B, T, V, dtype=next(model.parameters()).dtype, device=full.device)
    session, pos, starts = ForcedSession(model, prefix_cache), 0, []
    for n_prompt, n_decode in turns:
        reply = full[:, pos + n_prompt:][:, :n_decode + 1]
        if reply.shape[1] == n_decode:  # the row ends: a last token that is never fed
            reply = torch.cat([reply, torch.zeros_like(full[:, :1])], 1)
        session.forced_turn(full[:, pos:pos + n_prompt], reply)
        pos += n_prompt
        starts.append(pos - 1)
        out[:, pos - 1:pos + n_decode] = session.logits[-1][:, :n_decode + 1]
        pos += n_decode + 1
    return out, starts, session.cache


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_equal_uncached(arch, sharp):
    """With sharp attention in float64 (conftest.sharpen) the two agree to 1e-13, and a decode
    position off by one moves logits by more than 1."""
    rng = random.Random(ARCHS.index(arch))
    torch.manual_seed(0)
    for _ in range(6):
        model = sharp(build_model(arch, tiny(rng))).eval()
        P, G = rng.choice([1, 2, rng.randint(3, 20)]), rng.randint(1, 8)
        full = torch.randint(0, V, (2, P + G))
        with torch.no_grad():
            cached, starts, _ = run_session(model, full, [(P, G - 1)])
            ref = forward_logits(arch, model, full, starts)
        span = slice(P - 1, P + G - 1)
        assert (cached[:, span] - ref[:, span]).abs().max() < 1e-9, (P, G)


@pytest.mark.parametrize("arch", ARCHS)
def test_three_turn_session_equals_one_forward(arch, sharp):
    """bdd: one forward with block boundaries at the turn starts; the encoder cache is reused and
    only the new tokens are encoded each turn. Sharp attention in float64, as above."""
    torch.manual_seed(1)
    model = sharp(build_model(arch, tiny(random.Random(3), n_layer=3, n_dec_layer=1))).eval()
    turns = [(5, 3), (4, 2), (6, 4)]
    T = sum(p + d + 1 for p, d in turns) - 1
    full = torch.randint(0, V, (2, T))
    with torch.no_grad():
        cached, starts, cache = run_session(model, full, turns)
        ref = forward_logits(arch, model, full, starts)
    assert starts == [4, 12, 21]
    fed = [i for s, (p, d) in zip(starts, turns) for i in range(s, s + d + 1)]
    assert (cached[:, fed] - ref[:, fed]).abs().max() < 1e-9
    # what the last prefill had to encode: bdd the tokens since the previous block start
    # (3 decoded + 1 pending + 5 of the new prompt), encdec the whole history, dec the new tokens
    assert cache.encoded == {"bdd": 21 - 12, "encdec": 21, "dec": 7}[arch]


@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_cached_logits_equal_uncached_with_every_attention_option(arch, kw, sharp):
    """GQA and MQA on all three archs, cross-layer K/V sharing on dec: a three-turn session
    equals one forward, as above."""
    torch.manual_seed(2)
    cfg = tiny(random.Random(0), **{"n_layer": 4, "n_dec_layer": 2, "n_head": 4, **kw})
    model = sharp(build_model(arch, cfg)).eval()
    turns = [(5, 3), (1, 2), (6, 4)]
    full = torch.randint(0, V, (2, sum(p + d + 1 for p, d in turns) - 1))
    with torch.no_grad():
        cached, starts, _ = run_session(model, full, turns)
        ref = forward_logits(arch, model, full, starts)
    fed = [i for s, (p, d) in zip(starts, turns) for i in range(s, s + d + 1)]
    assert (cached[:, fed] - ref[:, fed]).abs().max() < 1e-9


def kv_positions(arch, cfg, P, G):
    """DESIGN.md section 3: positions x layers held to keep decoding after prefill(P) and G
    decode steps. The bdd decoder's self part holds the block's first token x[P-1] and the G
    decoded tokens, its cross part the P-1 encoder states; encdec is laid out the same way."""
    if arch == "dec":  # with cross-layer sharing, one cache per group of kv_share layers
        return math.ceil(cfg.n_layer / cfg.kv_share) * (P + G)
    return cfg.n_dec_layer * ((P - 1) + (1 + G))


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_bytes_follow_the_formula(arch):
    """Each cached position of a layer holds K and V of n_kv_head heads."""
    rng = random.Random(7)
    for _ in range(6):
        cfg = tiny(rng)
        cfg = replace(cfg, n_kv_head=rng.choice([d for d in (1, 2, 4) if cfg.n_head % d == 0]),
                      kv_share=rng.randint(1, cfg.n_layer) if arch == "dec" else 1)
        model = build_model(arch, cfg).eval()
        B, P, G = 3, rng.randint(1, 20), rng.randint(0, 10)
        with torch.no_grad():
            full = torch.randint(0, V, (B, P + G))
            _, _, cache = run_session(model, full, [(P, G)])
        per_position = 2 * B * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * 4  # float32
        held = nbytes(cache)
        assert held["decode"] == kv_positions(arch, cfg, P, G) * per_position
        prefix = cfg.n_enc_layer * (P - 1) if arch == "bdd" else 0
        assert held["prefix"] == prefix * per_position
        assert held["held"]["cpu"] >= held["decode"] + held["prefix"]


def test_bdd_over_dec_kv_ratio_is_n_dec_over_n_layer():
    cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=6, n_dec_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    dec, bdd = build_model("dec", cfg).eval(), build_model("bdd", cfg).eval()
    a, b = measure_decode(dec, 40), measure_decode(bdd, 40)  # 10 of the 40 positions decoded
    assert b["kv_bytes"] * 3 == a["kv_bytes"]
    assert b["prefix_bytes"] == 4 * (40 - 10 - 1) * 2 * 16 * 4
    # one more decoded token: bdd runs 2 of the 6 layers, at most a third of dec's layer FLOPs
    assert b["flops"]["layers"] <= a["flops"]["layers"] / 3
    assert b["flops"]["head"] == a["flops"]["head"] == 2 * 16 * V


def test_decode_flops_count_attention():
    cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_dec_layer=1, n_head=2, n_embd=16)
    model = build_model("dec", cfg).eval()
    short = measure_decode(model, 10)["flops"]["layers"]
    long = measure_decode(model, 50)["flops"]["layers"]
    # attention reads 40 more positions in each of 2 layers: q.k and p.v, 2 FLOPs per multiply-add
    assert long - short == 2 * 40 * 2 * (2 * 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_flops_follow_the_kv_projections(arch):
    """A decoded token's K/V projection shrinks with n_kv_head (16 -> 2 x 1 x 4 outputs, 2 rows);
    with kv_share only the first layer of each group has one. Attention reads the same keys per
    query head."""
    def layer_flops(**kw):
        cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=4, n_dec_layer=1, n_head=4,
                          n_embd=16, **kw)
        return measure_decode(build_model(arch, cfg).eval(), 20, batch_size=2)["flops"]["layers"]
    mha, projection = layer_flops(), 2 * 2 * 16 * (2 * 16)  # 2 FLOPs x 2 rows x in x out
    decoding_layers = 4 if arch == "dec" else 1
    assert mha - layer_flops(n_kv_head=1) == decoding_layers * projection * (1 - 1 / 4)
    if arch == "dec":
        assert mha - layer_flops(kv_share=2) == 2 * projection
        assert mha - layer_flops(kv_share=3) == 2 * projection  # groups (0, 1, 2) and (3)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_deterministic_and_seeded_sampling_reproducible(arch):
    torch.manual_seed(0)
    model = build_model(arch, tiny()).eval()
    idx = torch.randint(0, V, (2, 5))
    g1 = generate(model, idx, 12, temperature=0)
    assert torch.equal(g1, generate(model, idx, 12, temperature=0))
    s = [generate(model, idx, 12, temperature=1.0, top_k=10,
                  generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(s[0], s[1])
    # greedy generation is the argmax of the training forward over what it wrote
    full = torch.cat([idx, g1], 1)[:, :-1]
    with torch.no_grad():
        ref = forward_logits(arch, model, full, [4])
    assert torch.equal(ref[:, 4:].argmax(-1), g1)


def test_session_refuses_to_overrun_the_context():
    model = build_model("bdd", tiny(block_size=12)).eval()
    session = Session(model)
    session.turn(torch.zeros(1, 6, dtype=torch.long), 4, temperature=0)
    with pytest.raises(ValueError, match="context full"):
        session.turn(torch.zeros(1, 2, dtype=torch.long), 4, temperature=0)


# -----------------------------------------------------------------------------
# sampling and stopping, on a scripted stand-in model whose logits are given step by step


class Scripted:
    """A stand-in for a model in generate(): whatever it is fed, its next-token logits are
    logits[i] (B, vocab) after prefill (i = 0) and after the i-th decode step."""

    def __init__(self, logits):
        self.logits = logits  # (steps, B, vocab)
        self.decoded = 0

    def new_cache(self):
        return SimpleNamespace(step=0)

    def prefill(self, idx, cache):
        return self.logits[0]

    def decode(self, idx, cache):
        cache.step += 1
        self.decoded += 1
        return self.logits[cache.step]


def sample_once(logits, seed=0, **sampling):
    """One generated token per row of logits (n, vocab): those are the rows' next-token logits."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return generate(Scripted(logits[None]), prompt, 1, generator=g, **sampling)[:, 0]


def test_top_k_samples_only_the_k_largest_logits():
    torch.manual_seed(0)
    logits = torch.randn(300, 10)
    assert torch.equal(sample_once(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    tokens = sample_once(logits, temperature=1.0, top_k=3)
    rank = (logits > logits.gather(1, tokens[:, None])).sum(1)  # 0: the largest logit
    assert set(rank.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_follow_softmax_over_temperature(temperature):
    """20,000 draws: each frequency within 0.015 (over 4 standard deviations) of
    softmax(logits / T); ignoring T would be off by 0.19 or more."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20_000
    tokens = sample_once(logits.expand(n, -1), temperature=temperature)
    freq = torch.bincount(tokens, minlength=5) / n
    assert (freq - torch.softmax(logits / temperature, -1)).abs().max() < 0.015


STOP = 7


def scripted_rows(rows, vocab=8):
    """Logits (steps, B, vocab) that make any sampler write rows[b][i] at step i."""
    return torch.nn.functional.one_hot(torch.tensor(rows).T, vocab).float() * 100.0


def test_generation_stops_when_every_row_has_written_a_stop_token():
    """Row 0 writes the stop token at step 2, row 1 at step 4: generation ends after step 4,
    not at the first row's stop and not at max_new_tokens."""
    rows = [[1, 2, STOP, 3, 3, 3, 3, 3], [1, 2, 3, 4, STOP, 5, 5, 5]]
    model = Scripted(scripted_rows(rows))
    tokens = generate(model, torch.zeros(2, 3, dtype=torch.long), 8, temperature=0,
                      stop_tokens=(STOP,))
    assert tokens.shape == (2, 5)
    assert torch.equal(tokens[1], torch.tensor(rows[1][:5]))
    assert tokens[0, 2] == STOP
    assert model.decoded == 4  # nothing is fed after the last stop token
    without = generate(Scripted(scripted_rows(rows)), torch.zeros(2, 3, dtype=torch.long), 8,
                       temperature=0)
    assert torch.equal(without, torch.tensor(rows))


# -----------------------------------------------------------------------------
# command line, on a checkpoint written here in train.py's format


def write_checkpoint(folder, arch="bdd", objective="prefix_lm", tokenizer="byte"):
    vocab = 257 + (N_SENTINELS if objective == "span" else 0)
    cfg = ModelConfig(vocab_size=vocab, block_size=64, n_layer=3, n_dec_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = build_model(arch, cfg)
    torch.save({"model": model.state_dict(), "arch": arch, "model_config": asdict(cfg),
                "tokenizer": tokenizer, "objective": objective, "iter_num": 0, "optimizer": {},
                "train_config": {}, "best_cont_loss": None, "history": {}, "rng": {}},
               folder / "ckpt.pt")
    return folder


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def span_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("span"), "encdec", "span")


def run_cli(*args, stdin=None):
    """The script in its own process, as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def run_main(capsys, monkeypatch, *args, stdin=""):
    """sample.main in this process (fast): returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else
                        io.TextIOWrapper(io.BytesIO(stdin)))  # bytes: a real stdin's layers
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped sample.main")
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_text_and_stats(ckpt_dir):
    r = run_cli("--out_dir", ckpt_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20, "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")
    assert "prompt 6 tokens, encoded 5, generated 20" in r.stdout
    assert "KV cache: decode" in r.stdout and "FLOPs per decoded token" in r.stdout


def test_cli_chat_reads_piped_turns(ckpt_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--chat", "--stats",
                              "--max_new_tokens", 5, stdin="hello\nthere\nagain\n")
    assert code == 0, err
    assert err.count("[turn ") == 3
    # turn 2 encodes the previous turn's block (first token + 4 fed reply tokens), the pending
    # reply token and "there" but its last token: 5 + 1 + 5
    assert "[turn 2] prompt 6 tokens, encoded 11" in err


def test_cli_chat_prefix_cache_drop_says_the_same_and_holds_less(ckpt_dir, capsys, monkeypatch):
    """--prefix_cache drop: the same replies (greedy), each turn re-encodes the whole history, and
    --stats shows the held bytes per device, fewer than with keep."""
    flags = ["--out_dir", ckpt_dir, "--chat", "--stats", "--max_new_tokens", 5, "--temperature", 0]
    runs = {policy: run_main(capsys, monkeypatch, *flags, "--prefix_cache", policy,
                             stdin="hello\nthere\nagain\n") for policy in ("keep", "drop")}
    assert runs["keep"][0] == runs["drop"][0] == 0
    assert runs["keep"][1] == runs["drop"][1]
    # turn 2 re-encodes turn 1 (6 tokens and 5 generated, the last pending) and "there" but its
    # last token: 6 + 4 + 1 + 5
    assert "[turn 2] prompt 6 tokens, encoded 16" in runs["drop"][2]

    def held(err):
        return [int(line.split("held: cpu ")[1].split(" B")[0].replace(",", ""))
                for line in err.splitlines() if "held: cpu " in line]
    assert all(d < k for d, k in zip(held(runs["drop"][2]), held(runs["keep"][2])))
    assert len(held(runs["drop"][2])) == 3


@pytest.mark.parametrize("args, message", [
    (["--out_dir", "nowhere"], "no checkpoint at nowhere"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x" * 80], "only 45 fit"),
    (["--max_new_tokens", 100], "runs past the model's context"),
    (["--temperature", -1], "--temperature -1.0 is out of range: it must be at least 0"),
    (["--temperature", "nan"], "--temperature nan is out of range: it must be at least 0"),
    (["--temperature", "inf"], "--temperature inf is out of range: it must be at least 0"),
    (["--chat", "--num_samples", 2], "--chat reads one conversation's turns from stdin: drop "
     "--num_samples"),
    (["--prompt", "a", "--prompts", "p.txt"], "give --prompt or --prompts, not both"),
    (["--prompts", "/no/such/file"], "cannot read the prompts file"),
    (["--batch_size", 0], "--batch_size 0 is out of range: it must be at least 1"),
    (["--top_k", 0], "--top_k 0 is out of range: it must be at least 1"),
    (["--prompt", "FILE:/no/such/file"], "cannot read the prompt file"),
    (["--device", "bogus"], "--device 'bogus' is not a device torch knows"),
    (["--prefix_cache", "sometimes"], "invalid choice: 'sometimes'"),
    (["--chat", "--prefix_cache", "offload", "--device", "cpu"], "it needs CUDA"),
    # the range train.py's --seed allows (torch.manual_seed overflows past 2**64)
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999 is out of range: "
     "it must be at least 0 and at most 1e+18"),
    (["--seed", -1], "--seed -1 is out of range"),
    (["--threads", 0], "--threads 0 is out of range: it must be at least 1"),
    (["--memory_limit_mb", 0], "--memory_limit_mb 0.0 is out of range: it must be above 0"),
    (["--memory_limit_mb", "inf"], "--memory_limit_mb inf is out of range: it must be above 0 "
     "and finite"),
    (["--num_samples", 0], "--num_samples 0 is out of range: it must be at least 1"),
    # the advice counts the prompt's tokens: 64 - 6 + 1 fit after "ROMEO:"
    (["--prompt", "ROMEO:", "--max_new_tokens", 100], "runs past the model's context (block_size "
     "64); the prompt has 6 tokens, which leave room for at most 59"),
    (["--prompt", "x" * 80, "--max_new_tokens", 100], "the prompt alone has 80 tokens: shorten "
     "it, or pass --truncate"),
    (["--prompt", "ROMEO:", "--max_new_tokens", 100, "--truncate"], "use at most 64 (--truncate "
     "cuts a prompt down to its last token)"),
    (["--chat", "--max_new_tokens", 100], "use at most 64"),
])
def test_cli_bad_input_exits_2_with_one_line(ckpt_dir, capsys, monkeypatch, args, message):
    if "--out_dir" not in args:
        args = ["--out_dir", ckpt_dir, "--max_new_tokens", 20, *args]
    code, out, err = run_main(capsys, monkeypatch, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
    assert "model from" not in err  # the error is the only line


def test_cli_empty_prompt_file_is_named(ckpt_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--prompt",
                              f"FILE:{tmp_path / 'empty.txt'}")
    assert code == 2 and out == ""
    assert err == f"error: the prompt file {tmp_path / 'empty.txt'} is empty; write the prompt in it\n"


def test_cli_longest_prompt_of_a_file_sets_the_advice(ckpt_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a\n" + "y" * 40 + "\nbb\n")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--prompts",
                              tmp_path / "p.txt", "--max_new_tokens", 1000)
    assert code == 2 and out == ""
    assert f"the longest prompt, line 2 of {tmp_path / 'p.txt'}, has 40 tokens, which leave room " \
           f"for at most 25\n" in err and err.count("\n") == 1


def test_cli_threads_sets_torchs_thread_count(ckpt_dir, capsys, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--max_new_tokens",
                                  3, "--threads", 1)
        assert code == 0, err
        assert torch.get_num_threads() == 1 and "on cpu, 1 thread(s)" in err
    finally:
        torch.set_num_threads(threads)


def test_cli_refuses_a_request_over_the_memory_limit_before_allocating(ckpt_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """1,000 rows of 20 positions of the test model need about 8.8 MB (KV cache 4.1 MB, logits
    4.1 MB, each row's prefill 0.5 MB): refused under --memory_limit_mb 1, and under the default limit (half the memory
    available) when 10 MB are; 4 rows fit. --batch_size x --num_samples rows count alike."""
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated anyway"))
    flags = ["--out_dir", ckpt_dir, "--max_new_tokens", 20]
    code, out, err = run_main(capsys, monkeypatch, *flags, "--num_samples", 1000,
                              "--memory_limit_mb", 1)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: this request needs about 8.8 MB (1,000 rows: 1 prompt(s) x "
                          "--num_samples 1000, of up to 20 positions") and \
        "over its limit of 1.0 MB (--memory_limit_mb)" in err
    monkeypatch.setattr(sample, "available_memory", lambda device: 10e6)
    code, out, err = run_main(capsys, monkeypatch, *flags, "--num_samples", 1000)
    assert code == 2 and "over its limit of 5.0 MB (50% of the 10.0 MB free on cpu" in err
    (tmp_path / "p.txt").write_text("line\n" * 40)
    code, out, err = run_main(capsys, monkeypatch, *flags, "--prompts", tmp_path / "p.txt",
                              "--batch_size", 40, "--num_samples", 50)
    assert code == 2 and "(2,000 rows: 40 prompt(s) x --num_samples 50, of up to 23" in err
    monkeypatch.setattr(sample, "generate", real_generate)
    code, out, err = run_main(capsys, monkeypatch, *flags, "--num_samples", 4,
                              "--memory_limit_mb", 1)
    assert code == 0, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_shows_no_library_warnings(ckpt_dir, span_dir, tmp_path, capsys, monkeypatch, dtype):
    (tmp_path / "p.txt").write_text("To be\nor not to be\nQ\n")
    with user_visible_warnings() as caught:
        for folder in (ckpt_dir, span_dir):
            for flags in (["--prompts", tmp_path / "p.txt", "--num_samples", 2],
                          ["--chat", "--prefix_cache", "drop"]):
                code, out, err = run_main(capsys, monkeypatch, "--out_dir", folder, "--dtype",
                                          dtype, "--max_new_tokens", 8, "--stats", *flags,
                                          stdin="hello\nthere\n")
                assert code == 0, err
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_cli_unknown_tokenizer_in_checkpoint(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path, tokenizer="klingon")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", tmp_path)
    assert code == 2 and "unknown tokenizer 'klingon'" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("chat", [False, True])
def test_cli_ctrl_c_exits_130_with_one_line(ckpt_dir, capsys, monkeypatch, chat):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Session, "turn", interrupted)
    monkeypatch.setattr(sample, "generate", interrupted)
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--max_new_tokens", 5,
                              *(["--chat"] if chat else []), stdin="hello\n")
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == "error: interrupted (Ctrl-C)" and "Traceback" not in err


def test_cli_sigint_while_chat_waits_for_a_line(ckpt_dir):
    """A real Ctrl-C (SIGINT) in a real process, while chat waits for its next line."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir",
                          str(ckpt_dir), "--chat", "--max_new_tokens", "5"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         preexec_fn=default_sigint)
    try:
        while "chat: one turn per line" not in p.stderr.readline():
            assert p.poll() is None, "sample.py ended before chat started"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)  # stdin stays open: the signal, not an end of input, stops the chat
        out, err = p.communicate()
    finally:
        p.kill()
    assert p.returncode == 130 and out == ""
    assert err.strip() == "error: interrupted (Ctrl-C)"


def test_cli_chat_refuses_non_utf8_stdin(ckpt_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--chat",
                              "--max_new_tokens", 3, stdin=b"hi\n\xff\xfe\nho\n")
    assert code == 2 and out  # turn 1 answered, then one error line
    assert "error: line 2 of stdin is not UTF-8 text" in err and "Traceback" not in err


LONG = "x" * 80 + "\n"


def test_cli_chat_turn_longer_than_the_context(ckpt_dir, capsys, monkeypatch):
    """Without --truncate: a clear line, exit 2, nothing answered (no silent dropping of the
    following lines); with it: every line answered, the conversation cut to its last tokens."""
    flags = ["--out_dir", ckpt_dir, "--chat", "--max_new_tokens", 10, "--temperature", 0, "--stats"]
    code, out, err = run_main(capsys, monkeypatch, *flags, stdin=LONG + "hello\n")
    assert code == 2 and out == ""
    assert "error: turn 1 has 81 tokens but only 64 positions are left" in err
    assert "the lines after it were not answered" in err
    code, out, err = run_main(capsys, monkeypatch, *flags, "--truncate", stdin=LONG + "hello\n")
    assert code == 0, err
    assert err.count("[turn ") == 2
    assert "[turn 1] prompt 55 tokens" in err and "cut to its last 55 tokens" in err


@pytest.mark.parametrize("flags, code, message", [
    ([], 2, "the prompt has 64 tokens but only 63 fit"),
    (["--truncate"], 0, "prompt 63 tokens, encoded 64"),
    (["--chat"], 2, "turn 1 has 64 tokens but only 63 positions are left"),
    (["--chat", "--truncate"], 0, "[turn 1] prompt 63 tokens, encoded 64"),
])
def test_cli_span_model_counts_its_sentinel(span_dir, capsys, monkeypatch, flags, code, message):
    """A span model's encoder reads the prompt plus a sentinel: a prompt of block_size tokens
    does not fit (it used to fail deep inside the model, at position 64)."""
    prompt = [] if "--chat" in flags else ["--prompt", "x" * 64]
    got, out, err = run_main(capsys, monkeypatch, "--out_dir", span_dir, "--max_new_tokens", 1,
                             "--stats", *prompt, *flags, stdin="x" * 63 + "\n")
    assert got == code, err
    assert message in out + err and "Traceback" not in err


def test_cli_truncate_keeps_the_end_of_a_long_prompt(ckpt_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--prompt",
                              "x" * 80 + "END", "--max_new_tokens", 20, "--truncate", "--stats")
    assert code == 0, err
    assert "prompt 45 tokens" in out


def test_cli_corrupt_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", tmp_path)
    assert code == 2 and "ckpt.pt is not a readable checkpoint" in err


@pytest.mark.parametrize("what, message", [
    ("folder", "ckpt.pt is a folder, not a checkpoint file"),
    ("list", "ckpt.pt holds a list, not a train.py checkpoint"),
])
def test_cli_checkpoint_that_is_not_one_says_what_it_is(tmp_path, capsys, monkeypatch, what,
                                                        message):
    if what == "folder":
        (tmp_path / "ckpt.pt").mkdir()
    else:
        torch.save([1, 2], tmp_path / "ckpt.pt")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", tmp_path)
    assert code == 2 and message in err and err.count("\n") == 1


def test_span_model_fills_a_sentinel_t5_style():
    """A span-corruption encdec generates as trained: the encoder reads prompt + sentinel, the
    decoder starts from [eot, sentinel]; greedy tokens are the training forward's argmax."""
    n_vocab, eot = V - 5, V - 6  # the last 5 ids play the sentinels
    torch.manual_seed(0)
    model = build_model("encdec", tiny()).eval()
    prompt = torch.randint(0, n_vocab, (2, 7))
    gen = Session(model, span_sentinel=n_vocab, eot=eot).turn(prompt, 6, temperature=0, last=True)
    sentinel = torch.full((2, 1), n_vocab)
    dec_x = torch.cat([torch.full((2, 1), eot), sentinel, gen.tokens[:, :-1]], 1)
    with torch.no_grad():
        logits = model({"enc_x": torch.cat([prompt, sentinel], 1), "dec_x": dec_x})[0]
    assert torch.equal(logits[:, 1:].argmax(-1), gen.tokens)
    assert gen.encoded == 8


def test_cli_prompts_file_prints_each_prompt_in_input_order(ckpt_dir, tmp_path, capsys,
                                                            monkeypatch):
    """Batches of different lengths print what each prompt prints alone (greedy)."""
    lines = ["To be", "or not to be, that is", "Q", "x" * 30]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    flags = ["--out_dir", ckpt_dir, "--max_new_tokens", 12, "--temperature", 0]
    code, out, err = run_main(capsys, monkeypatch, *flags, "--prompts", tmp_path / "prompts.txt",
                              "--batch_size", 3, "--stats")
    assert code == 0, err
    alone = "".join(run_main(capsys, monkeypatch, *flags, "--prompt", line)[1] for line in lines)
    printed = [l for l in out.splitlines() if not l.startswith(("[prompt", "FLOPs"))]
    assert printed == alone.splitlines()
    assert "[prompts 1-3] 3 rows, prompt 1 to 21 tokens" in out and "[prompt 4] prompt 30" in out


def test_cli_num_samples_are_rows_of_the_batch(ckpt_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--prompt", "ROMEO:",
                              "--max_new_tokens", 10, "--temperature", 0, "--num_samples", 3,
                              "--stats")
    assert code == 0, err
    samples = out.split("---------------\n")[:3]
    assert len(set(samples)) == 1 and samples[0].startswith("ROMEO:")
    assert "3 rows, prompt 6 tokens, encoded 5, generated 30" in out


@pytest.mark.parametrize("text, flags, message", [
    ("", [], "the prompts file {} is empty"),
    ("\n", [], "line 1 of {} is empty (1 empty lines in all)"),
    ("a\n\nb\n\n", [], "line 2 of {} is empty (2 empty lines in all)"),
    ("a\n" + "y" * 60 + "\n", [], "line 2 of {} has 60 tokens but only 45 fit"),
])
def test_cli_bad_prompts_file_exits_2(ckpt_dir, tmp_path, capsys, monkeypatch, text, flags,
                                      message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--max_new_tokens", 20,
                              "--prompts", path, *flags)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message.format(path)}")
    assert err.count("\n") == 1 and "model from" not in err


def test_cli_prompts_file_truncates_long_lines(ckpt_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a\n" + "y" * 60 + "\n")
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--max_new_tokens", 20,
                              "--prompts", tmp_path / "p.txt", "--truncate", "--stats")
    assert code == 0, err
    assert "2 rows, prompt 1 to 45 tokens" in out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_decoding_writes_what_eager_writes(arch):
    """generate(compile=True): the decode step compiled (torch.compile) on a StaticCache writes
    eager's tokens, greedy and seeded sampling alike, and compiles once for later calls."""
    torch.manual_seed(0)
    model = build_model(arch, tiny(random.Random(1), block_size=48)).eval()
    idx = torch.randint(0, V, (2, 9))
    for sampling in (dict(temperature=0), dict(temperature=1.0, top_k=5)):
        runs = [generate(model, idx, 20, generator=torch.Generator().manual_seed(3), compile=c,
                         **sampling) for c in (False, True, True)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), sampling


@pytest.mark.slow
def test_cli_compile_prints_what_eager_prints(ckpt_dir, tmp_path, capsys, monkeypatch):
    """--compile: a batch of one prompt length decodes compiled, one of several lengths eagerly
    (left-padded); either prints what eager prints."""
    (tmp_path / "p.txt").write_text("To be\nor not\nQ\n")
    flags = ["--out_dir", ckpt_dir, "--max_new_tokens", 12, "--temperature", 0, "--prompts",
             tmp_path / "p.txt", "--batch_size", 2]
    eager = run_main(capsys, monkeypatch, *flags)
    compiled = run_main(capsys, monkeypatch, *flags, "--compile")
    assert eager[0] == compiled[0] == 0, compiled[2]
    assert eager[1] == compiled[1]


def test_a_tiny_temperature_samples_the_largest_logit():
    """Temperatures far below 1 (down to the smallest float) sample the argmax: dividing the
    logits first would make inf - inf = nan probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(50, 10) * 10
    for t in (1e-45, 1e-30, 1e-6):
        assert torch.equal(sample_once(logits, temperature=t), logits.argmax(-1)), t


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "hi"], "drop --prompt"), (["--batch_size", 4], "drop --batch_size"),
    (["--prompts", "p.txt", "--num_samples", 2], "drop --prompts, --num_samples"),
    (["--compile"], "drop --compile")])
def test_cli_chat_refuses_the_flags_it_would_ignore(ckpt_dir, capsys, monkeypatch, flags, message):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--chat", *flags,
                              stdin="hello\n")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --chat reads one conversation's turns from stdin: ") and \
        message in err


def test_cli_chat_is_refused_over_the_memory_limit_before_allocating(ckpt_dir, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(Session, "turn", lambda *a, **k: pytest.fail("chatted anyway"))
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--chat",
                              "--max_new_tokens", 8, "--memory_limit_mb", 0.01, stdin="hello\n")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "a conversation of up to 64 positions" in err and "over its limit of 10.0 kB" in err


def test_cli_device_meta_is_refused(ckpt_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--device", "meta")
    assert code == 2 and "--device meta: only cpu and cuda are supported" in err


def test_cli_chat_says_when_a_reply_is_cut_to_the_room_left(ckpt_dir, capsys, monkeypatch):
    """block_size 64: the first reply of 40 tokens leaves 64 - 6 - 40 + 1 positions; the second
    turn's reply gets what is left of its 40 and a line says so."""
    code, out, err = run_main(capsys, monkeypatch, "--out_dir", ckpt_dir, "--chat",
                              "--max_new_tokens", 40, "--temperature", 0, stdin="hello\nyou\n")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: turn 2's reply was cut to ")
