"""The GPU preset's code paths, run on this CPU: bf16 autocast, the --flex fallback, compare.py's GPU
preset, and (marked slow, run by .ci/run) torch.compile. On a CUDA machine the same file also
checks the GPU itself: cached == uncached, FlexAttention == dense masks in bf16, compiled ==
eager training (bench/gpu_check.sh runs it there). Nothing here needs a GPU to pass."""

import json
import random
import warnings

import pytest
import torch

import compare
import config as cfg
import model as model_py
import train
from mask import block_ids
from model import ARCHS, ModelConfig, build_model
from serve.memory import nbytes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bench/gpu_check.sh)")
TINY = dict(n_layer=3, n_dec_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
            max_iters=4, eval_interval=4, eval_iters=1, warmup_iters=1, learning_rate=3e-3,
            seed=0, overwrite=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_paths")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    (folder / "tiny.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8))
                                               for _ in range(300)) + "\n")
    return folder


def losses(corpus, arch, log=lambda s: None, **kw):
    """Per-iteration training losses of a 4-step tiny run."""
    config = cfg.TrainConfig(**{**TINY, "arch": arch, "data": str(corpus / "tiny.txt"),
                                  "data_root": str(corpus / "data"),
                                  "out_dir": str(corpus / f"{arch}-{sorted(kw.items())}"), **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's notes on graph breaks
        return train.train(config, log=log)["iter_losses"]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_trains_like_float32(corpus, arch):
    """Autocast is really on (the losses move) and stays close to float32 (bf16 keeps about three
    significant digits; measured differences are near 2e-4 here)."""
    fp32, bf16 = losses(corpus, arch), losses(corpus, arch, dtype="bfloat16")
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert 0 < max(diffs) < 0.02


def test_flex_off_cuda_falls_back_to_the_dense_masks(corpus):
    """FlexAttention has no CPU backward: --flex on the CPU warns once and trains the same
    function with the dense masks, so the losses are identical."""
    lines = []
    flex = losses(corpus, "bdd", log=lines.append, flex=True, device="cpu")
    assert flex == losses(corpus, "bdd", device="cpu")
    assert sum(line.startswith("warning: --flex needs CUDA") for line in lines) == 1


def compare_gpu_preset(corpus, *flags):
    """compare.py --preset gpu on the CPU with tiny sizes; returns results.json."""
    out = corpus / ("gpu_preset" + "".join(flags))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare.main(["--preset", "gpu", "--device", "cpu", "--out_dir", str(out),
                      "--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                      "--max_iters", "2", "--eval_interval", "2", "--warmup_iters", "1",
                      "--gradient_accumulation_steps", "2", "--repeats", "1",
                      "--kv_budget_mb", "0.05", "--serving_max_batch", "4", *flags,
                      *[f"--{k}={v}" for k, v in TINY.items()
                        if k in ("n_layer", "n_dec_layer", "n_head", "n_embd", "block_size",
                                 "batch_size", "eval_iters")]])
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # 25 s: bf16 matrix products over gpt2's 50,257-token vocabulary on the CPU
def test_compare_gpu_preset_runs_on_the_cpu(corpus, capsys):
    """The GPU preset's path (gpt2 tokens, bf16, flex requested, dropout, accumulation) end to
    end; torch.compile is left to the slow test below."""
    from test_corpus import tokenizer_or_skip
    tokenizer_or_skip("gpt2")
    results = compare_gpu_preset(corpus, "--no-compile")
    config = results["config"]
    assert (config["tokenizer"], config["dtype"], config["flex"]) == ("gpt2", "bfloat16", True)
    assert set(results["archs"]) == set(ARCHS)
    assert all(r["cont_loss"] > 0 for r in results["archs"].values())
    assert "warning: --flex needs CUDA" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_gpu_preset_with_compile_runs_on_the_cpu(corpus):
    from test_corpus import tokenizer_or_skip
    tokenizer_or_skip("gpt2")
    results = compare_gpu_preset(corpus)
    assert results["config"]["compile"] is True
    assert all(r["cont_loss"] > 0 for r in results["archs"].values())


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_equals_eager(corpus, arch, device):
    """inductor's kernels round differently from eager's: measured differences are below 1e-6 on
    the CPU. (A compiled bdd takes the dense mask rather than the block-by-block loop.)"""
    from torch._dynamo.utils import counters
    eager = losses(corpus, arch, device=device, dtype="float32")
    graphs = counters["stats"]["unique_graphs"]
    compiled = losses(corpus, arch, device=device, dtype="float32", compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # it really compiled
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4


# -----------------------------------------------------------------------------
# on the GPU itself

GPU = "cuda"  # the device of the tests below


def tiny_model(arch, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=97, block_size=256, n_layer=3, n_dec_layer=1,
                                n_head=4, n_embd=64), **kw})
    torch.manual_seed(0)
    return build_model(arch, cfg).to(GPU)


GQA, CLA = dict(n_kv_head=2), dict(kv_share=2)
OPTIONS = [(arch, kw) for arch in ARCHS for kw in ({}, GQA)] + [("dec", CLA)]
# The archs whose training forward takes FlexAttention block masks under flex=True: bdd's decoder
# (the doubly-causal mask), encdec's encoder and cross-attention over a padded source. Causal
# self-attention (dec, the bdd encoder, encdec's decoder) is SDPA's causal kernel either way.
FLEX_OPTIONS = [(arch, kw) for arch, kw in OPTIONS if arch != "dec"]


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_cached_equals_uncached_on_cuda(arch, kw, dtype, tol):
    """Prefill + decode on the GPU give the training forward's logits (bdd with its boundary at the
    prompt's last token), under the dtype's autocast; with GQA, and CLA on dec."""
    from test_sample import V, forward_logits, run_session
    model = tiny_model(arch, vocab_size=V, **kw).eval()
    full = torch.randint(0, V, (2, 60), device=GPU)
    with torch.no_grad(), torch.autocast(torch.device(GPU).type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        cached, starts, _ = run_session(model, full, [(40, 19)])
        ref = forward_logits(arch, model, full, starts)
    span = slice(39, 59)
    assert (cached[:, span].float() - ref[:, span].float()).abs().max() < tol


@needs_cuda
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("arch, kw", FLEX_OPTIONS)
def test_flex_equals_dense_on_cuda_in_bf16(arch, kw, shared, monkeypatch):
    """Compiled FlexAttention block masks against the dense masks (bdd: its block-by-block
    layout), forward and backward, in bf16; with GQA. encdec's source is padded (shared: every
    row the same length), so that its encoder and cross-attention take block masks; the flex model
    really runs FlexAttention, the dense one never."""
    dense, flex = tiny_model(arch, **kw), tiny_model(arch, flex=True, **kw)
    flex.load_state_dict(dense.state_dict())
    B, T = 4, 256
    x = torch.randint(0, 97, (B, T), device=GPU)
    ids = block_ids(T, [40, 100, 101, 200])
    source_lengths = torch.tensor([70] * B if shared else [100, 70, 1, 99], device=GPU)
    batch = {"x": x, "y": x.roll(-1, 1), "block_ids": (ids if shared else ids.expand(B, T)).to(GPU),
             "enc_x": x[:, :100], "dec_x": x[:, 100:], "y_dec": x[:, 100:].roll(-1, 1),
             "enc_mask": torch.arange(100, device=GPU) < source_lengths[:, None]}
    if arch == "encdec":
        batch["y"] = batch.pop("y_dec")
    flex_calls = []
    real_flex = model_py.flex_attention
    monkeypatch.setattr(model_py, "flex_attention",
                        lambda *a: (flex_calls.append(1), real_flex(*a))[1])
    results, calls = [], []
    for model in (dense, flex):
        with torch.autocast(torch.device(GPU).type, dtype=torch.bfloat16):
            logits, loss = model(batch)
        loss.backward()
        calls.append(len(flex_calls))
        results.append((logits.float(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                   if p.grad is not None])))
    assert calls[0] == 0 and calls[1] > 0, calls
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() < 0.1
    assert (ga - gb).norm() < 0.05 * ga.norm()


@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_prefix_cache_gives_the_uncached_logits_on_cuda(arch):
    """prefix_cache="offload": between turns bdd's encoder cache sits in pinned host memory and
    none of it on the GPU; each prefill brings it back, and every logit is the training forward's
    (dec and encdec have no encoder cache: nothing moves)."""
    from test_sample import V, forward_logits, run_session
    model = tiny_model(arch, vocab_size=V).eval()
    turns = [(30, 9), (20, 9), (25, 9)]
    full = torch.randint(0, V, (2, sum(p + d + 1 for p, d in turns) - 1), device=GPU)
    with torch.no_grad():
        cached, starts, cache = run_session(model, full, turns, prefix_cache="offload")
        ref = forward_logits(arch, model, full, starts)
    fed = [i for s, (p, d) in zip(starts, turns) for i in range(s, s + d + 1)]
    assert (cached[:, fed] - ref[:, fed]).abs().max() < 1e-4
    held = nbytes(cache)
    on_host = cache.encoder_tensors()  # bdd's encoder cache; none for dec and encdec
    assert all(t.device.type == "cpu" and t.is_pinned() for t in on_host)
    assert bool(on_host) == (arch == "bdd")
    assert held["prefix_held"] == ({"cpu": held["prefix"]} if arch == "bdd" else {})
    assert held["held"].get("cpu", 0) == held["prefix"]  # nothing else is on the host


@needs_cuda
def test_offload_session_writes_what_keep_writes_on_cuda():
    """A padded batch, three greedy turns: the same tokens under keep, drop and offload."""
    from serve.session import Session
    model = tiny_model("bdd").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[torch.randint(0, 97, (n,), generator=g) for n in lengths]
               for lengths in ([9, 3, 14], [5, 11, 2], [7, 7, 1])]
    tokens = {}
    for policy in ("keep", "drop", "offload"):
        session = Session(model, prefix_cache=policy)
        tokens[policy] = [session.turn([p.to(GPU) for p in turn], 6, temperature=0).tokens
                          for turn in prompts]
    for policy in ("drop", "offload"):
        assert all(torch.equal(a, b) for a, b in zip(tokens["keep"], tokens[policy])), policy


# The CUDA caching allocator hands out device memory in blocks of a multiple of 512 bytes (a
# storage under 1 MB gets exactly its size rounded up, carved from the small pool), and
# memory_allocated() counts the blocks: each storage may take up to 511 bytes more than it holds.
BLOCK = 512


def allocated_growth(run):
    """(what run() returns, the bytes memory_allocated() grew by while it is alive). run is called
    once before, so that one-time allocations (cuBLAS workspaces) are not counted; everything
    else it allocates and does not return (activations, logits, sampled tokens) is freed."""
    with torch.no_grad():
        run()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        kept = run()
        torch.cuda.synchronize()
        return kept, torch.cuda.memory_allocated() - before


@needs_cuda
@pytest.mark.parametrize("policy", ["generate", "keep", "drop", "offload"])
@pytest.mark.parametrize("arch", ARCHS)
def test_held_bytes_are_what_cuda_allocated(arch, policy):
    """serve.memory.nbytes(cache)["held"] on the GPU is what the allocator gave the cache: after
    one turn of generate() on a padded batch (serve.cache.padded_batch; bdd's encoder runs without
    a cache), or two padded turns of a session under each policy, memory_allocated() has grown by
    the cache's held cuda bytes, up to the allocator's rounding of each storage (BLOCK);
    offload's encoder cache is in pinned host memory, not on the GPU."""
    from generate import generate
    from serve.cache import padded_batch
    from serve.session import Session
    model = tiny_model(arch).eval()
    device = str(next(model.parameters()).device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).to(GPU) for n in (30, 17)]

    def run():
        if policy == "generate":
            idx, cache = padded_batch(model, prompts)
            generate(model, idx, 20, temperature=0, cache=cache)
            return cache
        session = Session(model, prefix_cache=policy)
        session.turn(prompts, 20, temperature=0)
        return session.turn([p[:9] for p in prompts], 20, temperature=0).cache

    cache, grown = allocated_growth(run)
    counted = nbytes(cache)
    on_gpu = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in cache.tensors() if t.device == torch.device(device)}
    held = counted["held"][device]
    assert held == sum(on_gpu.values()) > 0
    assert held <= grown <= held + (BLOCK - 1) * len(on_gpu), (held, grown, len(on_gpu))
    offloaded = arch == "bdd" and policy == "offload"
    assert counted["held"].get("cpu", 0) == (counted["prefix"] if offloaded else 0)
    if offloaded:
        assert all(t.is_pinned() for t in cache.encoder_tensors())


@needs_cuda
def test_the_multi_turn_workload_offloads_on_cuda():
    """On CUDA the workload serves bdd offload too: on the GPU it holds what drop holds, turn by
    turn; in host memory, the encoder cache (what keep holds more than drop on the GPU); every
    case's peak of memory_allocated() covers what it holds."""
    from lab import measure
    models = {arch: tiny_model(arch).eval() for arch in ("dec", "bdd")}
    plan = measure.multi_turn_plan(models, 4e6)
    cases = measure.multi_turn(models, plan, 1)["cases"]
    assert list(cases) == ["dec", "bdd keep", "bdd drop", "bdd offload"]
    keep, drop, offload = (cases[f"bdd {p}"] for p in ("keep", "drop", "offload"))
    assert offload["held_bytes_per_conv_by_turn"] == drop["held_bytes_per_conv_by_turn"]
    assert offload["encoded_per_turn"] == drop["encoded_per_turn"]
    assert keep["host_bytes_per_conv_by_turn"] == drop["host_bytes_per_conv_by_turn"] == [0] * 4
    for k, host in enumerate(offload["host_bytes_per_conv_by_turn"]):
        assert 0 < host <= keep["held_bytes_per_conv_by_turn"][k] - drop["held_bytes_per_conv_by_turn"][k]
    for c in cases.values():
        assert c["cuda_peak_bytes_per_conv"] >= c["held_bytes_per_conv_by_turn"][-1]
