"""The multi-turn serving workload (lab/measure.py): its numbers follow from what it measures.
Conversations in the budget are the budget over the peak bytes one conversation holds, counted
from every storage the session holds; at the 2:1 split bdd drop holds at most 0.36x dec's
while decoding and bdd keep about dec's; each arch's prefill encodes what DESIGN.md section 3
says; times to first token and decode tokens/s are medians of the times the session took."""

from types import SimpleNamespace

import pytest
import torch

from lab import measure
from model import ARCHS, ModelConfig, build_model
from serve import session as session_module
from serve.session import Session
from test_cache import per_device, reachable_storages

SPLIT = dict(vocab_size=50, block_size=64, n_layer=6, n_dec_layer=2, n_head=2, n_embd=32)


def models_of(archs=ARCHS, **kw):
    out = {}
    for arch in archs:
        torch.manual_seed(0)
        out[arch] = build_model(arch, ModelConfig(**{**SPLIT, **kw})).eval()
    return out


@pytest.fixture(scope="module")
def served():
    """(plan, results) of the workload on the tiny 2:1 models at a budget of 400 kB."""
    models = models_of()
    plan = measure.multi_turn_plan(models, 400_000)
    return plan, measure.multi_turn(models, plan, 1)


def test_the_shape_fills_the_context():
    assert measure.conversation_shape(256) == (4, 32, 32)
    assert measure.conversation_shape(1024) == (4, 128, 128)
    assert measure.conversation_shape(64) == (4, 8, 8)
    for block_size in range(4, 300):
        turns, n_in, n_out = measure.conversation_shape(block_size)
        assert turns * (n_in + n_out) <= block_size and n_out >= 2, block_size


def test_every_arch_and_policy_is_served():
    assert measure.multi_turn_cases(ARCHS, "cpu") == {
        "dec": ("dec", "keep"), "encdec": ("encdec", "keep"), "bdd keep": ("bdd", "keep"),
        "bdd drop": ("bdd", "drop")}
    assert measure.multi_turn_cases(["bdd"], "cuda")["bdd offload"] == ("bdd", "offload")


def test_conversations_are_the_budget_over_what_one_holds_at_its_peak(served):
    """The peak is read after every turn from every storage a session holds (its cache, the
    conversation's tokens, the pending tokens), counted here by walking them independently;
    the budget's conversations, served together, hold each the same and in all at most it."""
    plan, results = served
    models = models_of()
    for name, case in plan["cases"].items():
        session = Session(models[case["arch"]], prefix_cache=case["policy"])
        turns, n_in, n_out = plan["shape"]
        g = torch.Generator().manual_seed(0)
        peak = 0
        for _ in range(turns):
            session.turn(torch.randint(SPLIT["vocab_size"], (1, n_in), generator=g), n_out,
                         temperature=0)
            walked = per_device(reachable_storages([session.cache, session.rows,
                                                    session.pending]))
            peak = max(peak, walked["cpu"])
        assert case["held_bytes_per_conv"] == peak, name
        assert case["conversations"] == 400_000 // peak >= 1, name
        batch = results["cases"][name]
        assert max(batch["held_bytes_per_conv_by_turn"]) == peak, name
        assert batch["conversations"] * peak <= 400_000, name


def test_bdd_drop_holds_a_third_of_dec_and_keep_about_dec(served):
    """At the 2:1 split, after every turn's decoding (what the turn holds at its most and until
    the next turn), per conversation."""
    _, results = served
    held = {name: c["held_bytes_per_conv_by_turn"] for name, c in results["cases"].items()}
    for dec, drop, keep in zip(held["dec"], held["bdd drop"], held["bdd keep"]):
        assert drop <= 0.36 * dec
        assert 0.9 * dec <= keep <= 1.1 * dec


def test_encoder_tokens_per_turn(served):
    """encdec and bdd drop encode the whole history each turn (all of it but the turn's last
    prompt token, which starts the decoder); bdd keep only what came since its last block
    (the block's reply and the new prompt); dec prefills the new prompt and the pending reply
    token."""
    plan, results = served
    turns, n_in, n_out = plan["shape"]
    history = [k * (n_in + n_out) + n_in - 1 for k in range(turns)]
    expected = {"encdec": history, "bdd drop": history,
                "bdd keep": [n_in - 1] + [n_in + n_out] * (turns - 1),
                "dec": [n_in] + [n_in + 1] * (turns - 1)}
    for name, encoded in expected.items():
        assert results["cases"][name]["encoded_per_turn"] == encoded, name


def test_times_are_medians_of_what_the_session_took(monkeypatch):
    """A clock under serve.session.Session's control: in round r (0, 1, 2) each turn k's prefill takes
    (k + 1) * (r + 1) ms and its decode steps (r + 1) / 2 s. The times to first token are the
    medians (round 1's), decode tokens/s the median round's tokens over its decode seconds."""
    models = models_of(["dec"])
    plan = measure.multi_turn_plan(models, 400_000)
    turns, _, n_out = plan["shape"]
    calls = []

    def perf_counter():  # three calls per turn: start, prefill done, decoding done
        i = len(calls)
        r, k, phase = i // (3 * turns), (i // 3) % turns, i % 3
        calls.append(1)
        prefill, decode = (k + 1) * (r + 1) / 1000, (r + 1) / 2
        return 10.0 * (i // 3) + [0, prefill, prefill + decode][phase]

    monkeypatch.setattr(session_module, "time", SimpleNamespace(perf_counter=perf_counter))
    case = measure.multi_turn(models, plan, 3)["cases"]["dec"]
    assert len(calls) == 3 * 3 * turns
    assert case["ttft_ms_per_turn"] == pytest.approx([2.0 * (k + 1) for k in range(turns)])
    assert case["mean_ttft_ms"] == pytest.approx(2.0 * (turns + 1) / 2)
    n = case["conversations"]
    assert case["decode_tokens_per_sec"] == pytest.approx(n * (n_out - 1) / 1.0)


def test_a_budget_that_holds_no_conversation_is_refused():
    import config as cfg
    with pytest.raises(cfg.ConfigError, match="holds no dec conversation of 4 turns"):
        measure.multi_turn_plan(models_of(["dec"]), 1000)
