"""lab/convert.py and `train.py --init_from <a dec run> --arch bdd|--n_kv_head|--kv_share`: a
conversion with no uptraining gives exactly the parent's logits where that is mathematically true
(GQA/MQA from a dec whose grouped K/V heads are equal, CLA from a dec whose grouped layers project
equal K/V), bdd's encoder gives the parent's lower-layer states, a converted run starts from the
converted weights and the parent's data order, trains, resumes and samples like any other and
records its parent; a conversion that cannot be is one line, exit 2. Tiny float64 models with
sharp attention (conftest.sharpen) and a tiny corpus written here."""

from dataclasses import asdict

import pytest
import torch
from conftest import word_salad

import config as cfg
from lab import convert
import sample
import train
from model import ModelConfig, build_model

SHAPE = dict(vocab_size=64, block_size=16, n_layer=6, n_head=4, n_embd=32)


def parent_model(sharp, **shape):
    torch.manual_seed(0)
    config = ModelConfig(**{**SHAPE, **shape})
    return sharp(build_model("dec", config)).eval(), config


def converted(parent, config, arch, decoder_init="top", **target):
    """The target model (float64, eval) with the parent's weights converted into it."""
    target_config = ModelConfig(**{**asdict(config), **target})
    torch.manual_seed(1)
    model = build_model(arch, target_config).double().eval()
    state, record = convert.convert(parent.state_dict(), asdict(config), arch,
                                    asdict(target_config), model.state_dict(), decoder_init)
    model.load_state_dict(state)
    return model, record


def logits(model, x):
    return model({"x": x})[0]


def tokens(config, seed=0):
    return torch.randint(config.vocab_size, (2, config.block_size),
                         generator=torch.Generator().manual_seed(seed))


def kv_heads(block, n_kv, hs):
    """Views (n_kv, hs, C) of a layer's key rows and of its value rows."""
    w = block.attn.c_attn.weight
    C = w.shape[1]
    return w[C:C + n_kv * hs].view(n_kv, hs, C), w[C + n_kv * hs:].view(n_kv, hs, C)


def equalize_heads(model, config, n_kv_target):
    """Make each group of the heads that pooling into n_kv_target merges equal (the first's)."""
    hs, g = config.n_embd // config.n_head, config.n_kv_head // n_kv_target
    with torch.no_grad():
        for block in model.blocks[::config.kv_share]:
            for heads in kv_heads(block, config.n_kv_head, hs):
                heads.copy_(heads[::g].repeat_interleave(g, dim=0))


def equalize_groups(model, config, share):
    """Make each group of `share` layers project the K/V its first layer does: the layers before
    a group's last add nothing to the stream (zero output projections), so they all see the
    first one's input, and they share its ln_1 and K/V rows (their query rows stay their own)."""
    C = config.n_embd
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            first = model.blocks[i - i % share]
            if i % share != share - 1 and i != config.n_layer - 1:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
            block.ln_1.weight.copy_(first.ln_1.weight)
            block.attn.c_attn.weight[C:] = first.attn.c_attn.weight[C:]


# -----------------------------------------------------------------------------
# exact where it is mathematically true


@pytest.mark.parametrize("target", [dict(n_kv_head=2), dict(n_kv_head=1), dict(kv_share=2),
                                    dict(kv_share=3), dict(n_kv_head=1, kv_share=3)])
def test_a_conversion_without_uptraining_is_the_parent_where_that_is_true(sharp, target):
    parent, config = parent_model(sharp)
    x = tokens(config)
    before = logits(parent, x)
    untouched, _ = converted(parent, config, "dec", **target)
    assert (logits(untouched, x) - before).abs().max() > 1e-2  # in general a conversion changes it
    if "n_kv_head" in target:
        equalize_heads(parent, config, target["n_kv_head"])
    if "kv_share" in target:
        equalize_groups(parent, config, target["kv_share"])
    model, record = converted(parent, config, "dec", **target)
    assert record["target"] == convert.variant("dec", asdict(model.config))
    torch.testing.assert_close(logits(model, x), logits(parent, x), rtol=0, atol=1e-10)


def test_pooled_heads_are_the_means_of_the_heads_their_query_heads_read(sharp):
    parent, config = parent_model(sharp)
    model, _ = converted(parent, config, "dec", n_kv_head=2)
    hs = config.n_embd // config.n_head
    for old, new in zip(parent.blocks, model.blocks):
        for source, pooled in zip(kv_heads(old, 4, hs), kv_heads(new, 2, hs)):
            # query heads 0, 1 read source heads 0, 1 (of 4) and pooled head 0 (of 2)
            expected = torch.stack([(source[0] + source[1]) / 2, (source[2] + source[3]) / 2])
            torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-15)
        C = config.n_embd
        assert torch.equal(new.attn.c_attn.weight[:C], old.attn.c_attn.weight[:C])


def test_a_cla_follower_keeps_its_queries_and_drops_its_keys_and_values(sharp):
    parent, config = parent_model(sharp)
    model, record = converted(parent, config, "dec", kv_share=3)
    C = config.n_embd
    for i, (old, new) in enumerate(zip(parent.blocks, model.blocks)):
        rows = old.attn.c_attn.weight if i % 3 == 0 else old.attn.c_attn.weight[:C]
        assert torch.equal(new.attn.c_attn.weight, rows)
    assert "layers 1, 2, 4, 5 dropped" in " ".join(record["steps"])


@pytest.mark.parametrize("decoder_init", convert.DECODER_INITS)
def test_the_bdd_encoder_gives_the_parents_lower_layer_states(sharp, decoder_init):
    parent, config = parent_model(sharp)
    bdd, record = converted(parent, config, "bdd", decoder_init)
    n_enc = bdd.config.n_enc_layer
    x = tokens(config)
    rope = parent.rotary(torch.arange(x.shape[1]))
    h = parent.embed(x)
    for block in parent.blocks[:n_enc]:
        h, _ = block(h, rope, "causal")
    e = bdd.embed(x)
    for block in bdd.encoder:
        e, _ = block(e, rope, "causal")
    torch.testing.assert_close(e, h, rtol=0, atol=1e-12)
    # ln_enc is the parent's norm of the states at that depth: with `top` the first decoder
    # layer projects the earlier blocks' keys and values exactly as the parent's layer n_enc
    memory = bdd.encode(x, rope, "causal")
    torch.testing.assert_close(memory, parent.blocks[n_enc].ln_1(h), rtol=0, atol=1e-12)
    if decoder_init == "top":
        _, kv = parent.blocks[n_enc].attn.project(parent.blocks[n_enc].ln_1(h), rope)
        for mine, theirs in zip(bdd.decoder[0].attn.keys_values(memory, rope), kv):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    first = {"top": n_enc, "bottom": 0}.get(decoder_init)
    for j, layer in enumerate(bdd.decoder):
        for name, p in layer.state_dict().items():
            if first is not None:
                assert torch.equal(p, parent.blocks[first + j].state_dict()[name]), name
    if decoder_init == "fresh":  # the target's own init: what the run's seed draws
        torch.manual_seed(1)
        fresh = build_model("bdd", bdd.config).double()
        for name, p in bdd.decoder.state_dict().items():
            assert torch.equal(p, fresh.decoder.state_dict()[name]), name
    for name in ("wte.weight", "ln_f.weight"):
        assert torch.equal(bdd.state_dict()[name], parent.state_dict()[name])
    assert record["decoder_init"] == decoder_init and record["source"] == "dec"


# -----------------------------------------------------------------------------
# a converted run: train.py --init_from <a dec run>


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_salad(tmp_path_factory.mktemp("convert"))


def tiny(corpus, out_dir, **kw):
    """A tiny run; at a constant learning rate (no warmup, min_lr = learning_rate), as uptraining
    trains, so that a longer run is a shorter one continued."""
    config = dict(data=str(corpus / "tiny.txt"), data_root=str(corpus / "data"),
                  out_dir=str(out_dir), n_layer=3, n_dec_layer=1, n_head=2, n_embd=32,
                  block_size=32, batch_size=4, max_iters=4, learning_rate=1e-3, min_lr=1e-3,
                  warmup_iters=0, eval_interval=2, eval_iters=1, log_interval=2, seed=0)
    return cfg.TrainConfig(**{**config, **kw})


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def parents(corpus, tmp_path_factory):
    """{name: out_dir} of finished tiny runs: dec, dec:kv1, dec:cla2 (4 layers) and bdd."""
    out = {}
    for name, kw in {"dec": {}, "kv1": dict(n_kv_head=1), "cla2": dict(n_layer=4, kv_share=2),
                     "bdd": dict(arch="bdd")}.items():
        out[name] = tmp_path_factory.mktemp(name)
        train.train(tiny(corpus, out[name], **{"arch": "dec", **kw}), log=quiet)
    return out


def recorded_steps(monkeypatch):
    """[(weights at the step, its batch's x)] of every training step of the runs that follow."""
    steps = []
    real_step, real_batch = train.train_step, train.next_batch

    def step(model, *args):
        steps.append([{k: v.clone() for k, v in model.state_dict().items()}])
        return real_step(model, *args)

    def batch(*args):
        b = real_batch(*args)
        steps[-1].append(b["x"].clone())
        return b

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "next_batch", batch)
    return steps


@pytest.mark.parametrize("arch, target", [("bdd", {}), ("dec", dict(n_kv_head=1, kv_share=3))])
def test_a_converted_run_starts_from_the_conversion_and_the_parents_data(
        corpus, parents, tmp_path, monkeypatch, arch, target):
    steps = recorded_steps(monkeypatch)
    parent = cfg.load_checkpoint(parents["dec"] / "ckpt.pt")
    resumed = tmp_path / "parent"  # the parent continued by one step: the data it would see next
    resumed.mkdir()
    (resumed / "ckpt.pt").write_bytes((parents["dec"] / "ckpt.pt").read_bytes())
    train.train(tiny(corpus, resumed, arch="dec", init_from="resume", max_iters=5), log=quiet)
    history = train.train(tiny(corpus, tmp_path / "up", arch=arch, init_from=str(parents["dec"]),
                               **target), log=quiet)
    (_, parent_next), (first_weights, first_x) = steps[0], steps[1]
    config = tiny(corpus, tmp_path / "x", arch=arch, **target)
    fresh = cfg.fresh_model(config).state_dict()
    expected, record = convert.convert(parent["model"], parent["model_config"], arch,
                                       asdict(cfg.model_config(config)), fresh)
    assert first_weights.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(first_weights[name], value), name
    assert torch.equal(first_x, parent_next)  # the data order continues
    assert history["init_from"] == {"out_dir": str(parents["dec"]), "iter": 4,
                                    "conversion": record}
    saved = cfg.load_checkpoint(tmp_path / "up" / "ckpt.pt")
    assert saved["arch"] == arch and saved["history"]["init_from"]["conversion"] == record
    assert saved["model_config"]["n_kv_head"] == (1 if target else 2)


def test_a_converted_run_resumes_and_samples_like_any_other(corpus, parents, tmp_path, capsys):
    """At uptraining's constant learning rate, a converted run stopped at step 2 and resumed to
    4, or continued in another folder from a copy of it (lab/uptrain.py's head start), ends
    with the weights of one converted and trained for 4 steps at once."""
    source = dict(arch="bdd", init_from=str(parents["dec"]), decoder_init="bottom")
    whole = train.train(tiny(corpus, tmp_path / "whole", **source), log=quiet)
    train.train(tiny(corpus, tmp_path / "cut", **source, max_iters=2), log=quiet)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ckpt.pt").write_bytes((tmp_path / "cut" / "ckpt.pt").read_bytes())
    for folder in ("cut", "copy"):
        history = train.train(tiny(corpus, tmp_path / folder, **{**source, "init_from": "resume"}),
                              log=quiet)
        assert history["curve"] == whole["curve"] and history["init_from"] == whole["init_from"]
        a, b = (cfg.load_checkpoint(tmp_path / f / "ckpt.pt")["model"] for f in ("whole", folder))
        assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    sample.main(["--out_dir", str(tmp_path / "copy"), "--prompt", "the king", "--max_new_tokens",
                 "8", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("the king")


@pytest.mark.parametrize("source, flags, message", [
    ("dec", ["--arch", "encdec"], "no conversion into encdec is defined"),
    ("kv1", ["--arch", "dec", "--n_kv_head", "2"], "has 1 K/V heads per layer: a conversion "
     "mean-pools them into fewer, so --n_kv_head must divide 1 (1)"),
    ("cla2", ["--arch", "bdd", "--n_layer", "4"], "shares K/V across 2 layers (cla2), but every "
     "bdd layer needs K/V of its own"),
    ("cla2", ["--arch", "dec", "--n_layer", "4", "--kv_share", "3"], "a conversion can only "
     "merge whole groups: give --kv_share a multiple of 2"),
    ("dec", ["--arch", "bdd", "--n_embd", "64"], "was trained with n_embd 32 (this run: 64); a "
     "conversion keeps its parent's shape"),
    ("dec", ["--arch", "bdd", "--block_size", "16"], "block_size 32 (this run: 16)"),
    ("dec", ["--arch", "bdd", "--n_layer", "4"], "n_layer 3 (this run: 4)"),
    ("dec", ["--arch", "dec", "--n_kv_head", "1", "--tokenizer", "gpt2"],
     "was trained with tokenizer byte (this run: gpt2)"),
    ("bdd", ["--arch", "dec"], "holds a bdd model, not dec; give --arch bdd"),
    ("bdd", ["--arch", "bdd", "--n_kv_head", "1"], "holds a bdd model, not bdd:kv1; give "
     "--n_kv_head 2 (a fine-tune keeps its source's model; conversions start from a dec run)"),
    ("bdd", ["--arch", "bdd", "--decoder_init", "top"], "holds a bdd model already, whose "
     "decoder a fine-tune keeps; drop --decoder_init"),
    ("dec", ["--arch", "dec", "--n_kv_head", "1", "--decoder_init", "top"],
     "--decoder_init top chooses the decoder layers of a bdd converted from a dec run"),
    (None, ["--arch", "bdd", "--decoder_init", "fresh"], "give it with --arch bdd --init_from"),
])
def test_a_conversion_that_cannot_be_is_one_line_exit_2(corpus, parents, tmp_path, capsys,
                                                        monkeypatch, source, flags, message):
    monkeypatch.setattr(train, "loop", lambda run: pytest.fail("trained"))
    base = ["--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"), "--n_layer",
            "3", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--out_dir",
            str(tmp_path / "out")]
    init = ["--init_from", str(parents[source])] if source else []
    with pytest.raises(SystemExit) as e:
        train.main(base + init + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and message in err, err
