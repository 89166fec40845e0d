"""The three architectures: nothing leaks from the future, BDD's one-call attention is the two
merged attentions of the authors' code less their attention sink (DESIGN.md section 2 lists how
our BDD differs from theirs), parameter counts and initial loss are what DESIGN.md says."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

import mask
import model as M
from mask import bdd_mask, block_ids
from model import ARCHS, ModelConfig, build_model

V = 37


def tiny(**kw):
    cfg = dict(vocab_size=V, block_size=32, n_layer=3, n_dec_layer=1, n_head=2, n_embd=16)
    return ModelConfig(**{**cfg, **kw})


def random_bounds(rng, T):
    return sorted(rng.sample(range(1, T), rng.randint(0, min(6, T - 1))))


def decoder_logits(arch, model, x, bounds, split, per_row=False):
    """Logits of the stream whose positions must not see their future: the whole row for dec and
    bdd, the decoder stream (source x[:split]) for encdec. bdd's layout is shared by the batch,
    (T,) block ids, which runs block by block, or given per row, (B, T), the dense mask."""
    if arch == "encdec":
        return model({"enc_x": x[:, :split], "dec_x": x[:, split:]})[0]
    ids = block_ids(x.shape[1], bounds)
    return model({"x": x, "block_ids": ids.expand_as(x) if per_row else ids})[0]


def leaked_position(arch, model, rng, T=20, trials=12, per_row=False):
    """First position i whose logits moved when tokens after i changed, or None."""
    for _ in range(trials):
        x = torch.randint(0, V, (2, T))
        bounds, split = random_bounds(rng, T), rng.randint(1, T - 2)
        base = decoder_logits(arch, model, x, bounds, split, per_row)
        first = split if arch == "encdec" else 0
        i = rng.randint(first, T - 2)
        x2 = x.clone()
        x2[:, i + 1:] = torch.randint(0, V, (2, T - i - 1))
        moved = decoder_logits(arch, model, x2, bounds, split, per_row)
        upto = i - first + 1  # stream positions <= i
        if not torch.allclose(base[:, :upto], moved[:, :upto], atol=1e-5):
            return i
    return None


GQA = dict(n_head=4, n_kv_head=2)  # two query heads per K/V head
MQA = dict(n_head=4, n_kv_head=1)
CLA = dict(n_layer=5, kv_share=2)  # dec: layers (0, 1), (2, 3), (4) share K/V
# Every attention option, for every arch it applies to.
OPTIONS = ([(arch, kw) for arch in ARCHS for kw in ({}, GQA, MQA)]
           + [("dec", CLA), ("dec", dict(CLA, **MQA))])


@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_no_leak_from_future_tokens(arch, kw):
    torch.manual_seed(0)
    model = build_model(arch, tiny(**kw)).eval()
    for per_row in ((False, True) if arch == "bdd" else (False,)):
        assert leaked_position(arch, model, random.Random(0), per_row=per_row) is None


def test_leak_check_catches_a_wrong_mask(leaky_masks):
    """The check above can fail: let the BDD decoder see its whole row (per-row layouts) or its
    whole block (a shared layout) and it reports a leak."""
    torch.manual_seed(0)
    model = build_model("bdd", tiny()).eval()
    for per_row in (True, False):
        assert leaked_position("bdd", model, random.Random(0), per_row=per_row) is not None


def dense_logits(model, x, per_row_ids):
    """The bdd forward through the dense T x 2T mask (the path of flex and compiled code)."""
    h = model.stream(x, bdd_mask(per_row_ids))
    return model.lm_head(model.ln_f(h))


@pytest.mark.parametrize("kw", [{}, GQA])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_block_by_block_equals_the_dense_mask(groups, kw):
    """Each group of rows runs block by block against only the keys its layout lets it see, and
    skips the last block's encoder states: logits and every gradient equal the dense mask's.
    groups: 1 layout for the batch ((T,) ids), 2 (each for 2 rows), 4 (one per row)."""
    torch.manual_seed(0)
    model = build_model("bdd", tiny(n_layer=4, n_dec_layer=2, **kw))
    rng = random.Random(groups)
    for T in (1, 2, 9, 20, 32):
        layouts = [[], list(range(1, T))] + [random_bounds(rng, T) for _ in range(groups - 2)]
        ids = block_ids(T, layouts[:groups]) if groups > 1 else block_ids(T, random_bounds(rng, T))
        per_row = ids.view(-1, T).repeat_interleave(4 // groups, dim=0)
        x, y = torch.randint(0, V, (4, T)), torch.randint(0, V, (4, T))
        results = []
        for forward in (lambda: model({"x": x, "y": y, "block_ids": ids}),
                        lambda: (logits := dense_logits(model, x, per_row),
                                 F.cross_entropy(logits.view(-1, V), y.view(-1)))):
            model.zero_grad()
            logits, loss = forward()
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
            results.append((logits.detach(), grads))
        (a, ga), (b, gb) = results
        assert (a - b).abs().max() < 1e-5, (T, layouts)
        assert max((g - h).abs().max() for g, h in zip(ga, gb)) < 1e-5, (T, layouts)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path", ["compiled", "flex"])
def test_the_dense_path_gives_each_group_of_rows_its_own_layout(path, sharp, monkeypatch):
    """Compiled code and FlexAttention take the dense masks, from per-row block ids that the
    forward expands from G layouts: row r must get the layout of its group, r // (B / G), not
    r % G (the two agree only when G is 1 or B). 6 rows in 3 groups, rows 1 to 4 differ;
    compiled is stood in for by is_compiling(), flex runs eagerly on the CPU."""
    torch.manual_seed(0)
    model = sharp(build_model("bdd", tiny(n_layer=4, n_dec_layer=2))).eval()
    dense = model
    if path == "flex":
        dense = build_model("bdd", tiny(n_layer=4, n_dec_layer=2, flex=True)).double().eval()
        dense.load_state_dict(model.state_dict())
    T = 16
    batch = {"x": torch.randint(0, V, (6, T)), "block_ids": block_ids(T, [[3, 9], [], [5, 6, 12]])}
    with torch.no_grad():
        by_block = model(batch)[0]
        if path == "compiled":
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert (dense(batch)[0] - by_block).abs().max() < 1e-9


def test_block_ids_must_fit_the_rows():
    model = build_model("bdd", tiny())
    with pytest.raises(AssertionError, match="do not split 4 rows evenly"):
        model({"x": torch.zeros(4, 8, dtype=torch.long), "block_ids": torch.zeros(3, 8).long()})


def two_attention_reference(q, k_enc, v_enc, k_dec, v_dec, ids, sink=False):
    """The authors' two-attention form: cross-attention to earlier blocks' encoder states and
    causal self-attention in the block, computed separately and merged by
    sigmoid(lse_self - lse_cross). sink=True adds their attention sink (encoder position 0 seen by
    every query); without it a row with no cross key takes its self part only."""
    hs, T = q.shape[-1], q.shape[2]
    pos = torch.arange(T)
    cross_ok = ids[:, None] > ids[None, :]                                       # b(k) < b(q)
    cross_ok[:, 0] |= sink
    self_ok = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])  # same block, k <= q

    def part(k, v, ok):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse).nan_to_num(0.0)  # rows with no allowed key contribute nothing
        return p @ v, lse

    o_cross, lse_cross = part(k_enc, v_enc, cross_ok)
    o_self, lse_self = part(k_dec, v_dec, self_ok)
    w_self = torch.sigmoid(lse_self - lse_cross)  # 1 where the cross part is empty
    return w_self * o_self + (1 - w_self) * o_cross


def test_one_call_attention_equals_two_merged_attentions():
    rng = random.Random(0)
    for _ in range(20):
        T = rng.randint(2, 24)
        ids = block_ids(T, random_bounds(rng, T))
        q, ke, ve, kd, vd = (torch.randn(2, 3, T, 8) for _ in range(5))
        dec_mask = bdd_mask(ids)
        one_call = M.attention(q, torch.cat([ke, kd], 2), torch.cat([ve, vd], 2), dec_mask)
        ref = two_attention_reference(q, ke, ve, kd, vd, ids)
        assert (one_call - ref).abs().max() < 1e-5


def test_the_authors_sink_changes_block_0_only():
    """Their sink, added to our one-call mask as one more allowed key (encoder position 0), gives
    their form on every row; without it the two differ on block 0's rows and nowhere else."""
    T = 12
    ids = block_ids(T, [4, 9])
    q, ke, ve, kd, vd = (torch.randn(2, 3, T, 8) for _ in range(5))
    dec_mask = bdd_mask(ids)
    theirs = two_attention_reference(q, ke, ve, kd, vd, ids, sink=True)
    ours = M.attention(q, torch.cat([ke, kd], 2), torch.cat([ve, vd], 2), dec_mask)
    with_sink = dec_mask.clone()
    with_sink[:, 0] = True
    sunk = M.attention(q, torch.cat([ke, kd], 2), torch.cat([ve, vd], 2), with_sink)
    assert (sunk - theirs).abs().max() < 1e-5
    differs = (ours - theirs).abs().amax(dim=(0, 1, 3)) > 1e-4  # (T,) per query row
    assert differs.tolist() == (ids == 0).tolist()


def test_bdd_forward_equals_reference_decoder_layers(sharp):
    """The whole BDD model, recomputed with the two-attention form in every decoder layer (with
    our RMSNorm final norms and exact GELU; the authors' code has LayerNorm and the tanh GELU).
    Sharp attention in float64 (conftest.sharpen): encoder keys without their RoPE positions
    move logits by more than 1, the correct code by 1e-14."""
    torch.manual_seed(0)
    model = sharp(build_model("bdd", tiny(n_layer=4, n_dec_layer=2))).eval()
    T = 20
    x = torch.randint(0, V, (1, T))
    ids = block_ids(T, [5, 11, 12])
    rope = model.rotary(torch.arange(T))
    e = model.wte(x)
    for blk in model.encoder:
        e, _ = blk(e, rope, mask.causal_mask(T))
    memory = model.ln_enc(e)
    h = model.wte(x)
    for blk in model.decoder:
        a = blk.attn
        hn = blk.ln_1(h)
        ke, ve = a.keys_values(memory, rope)
        kd, vd = a.keys_values(hn, rope)
        y = two_attention_reference(a.queries(hn, rope), ke, ve, kd, vd, ids)
        h = h + a.c_proj(y.transpose(1, 2).reshape(1, T, -1))
        h = h + blk.mlp(blk.ln_2(h))
    ref_logits = model.lm_head(model.ln_f(h))
    logits, _ = model({"x": x, "block_ids": ids})
    assert (logits - ref_logits).abs().max() < 1e-9


def test_bdd_and_dec_differ_only_by_the_encoder_norm():
    for n_layer, n_dec in [(3, 1), (6, 2), (12, 4)]:
        cfg = tiny(n_layer=n_layer, n_dec_layer=n_dec, n_embd=32)
        dec, bdd = build_model("dec", cfg), build_model("bdd", cfg)
        encdec = build_model("encdec", cfg)
        assert bdd.num_params() - dec.num_params() == cfg.n_embd
        assert bdd.num_params(non_embedding=False) - bdd.num_params() == V * cfg.n_embd
        # encdec: + cross-attention (4 d^2) and its norm (d) per decoder layer, + encoder norm
        d = cfg.n_embd
        assert encdec.num_params() - dec.num_params() == n_dec * (4 * d * d + d) + d


def kv_params(cfg):
    """Parameters of one K/V projection: n_embd -> 2 x n_kv_head heads."""
    return cfg.n_embd * 2 * cfg.n_kv_head * (cfg.n_embd // cfg.n_head)


@pytest.mark.parametrize("kw", [GQA, MQA, dict(n_head=8, n_kv_head=2)])
def test_gqa_projects_fewer_keys_and_values(kw):
    """Each K/V projection shrinks to n_kv_head heads; nothing else changes, in any arch."""
    cfg, mha = tiny(n_embd=32, **kw), tiny(n_embd=32, n_head=kw["n_head"])
    saved = kv_params(mha) - kv_params(cfg)
    assert saved == 2 * 32 * 32 * (1 - kw["n_kv_head"] / kw["n_head"])
    for arch, projections in (("dec", 3), ("bdd", 3), ("encdec", 2 + 2 * 1)):
        assert build_model(arch, mha).num_params() - build_model(arch, cfg).num_params() == \
            projections * saved, arch


@pytest.mark.parametrize("n_layer, k", [(4, 2), (5, 2), (6, 3), (3, 3)])
def test_cla_layers_after_the_first_of_a_group_have_no_kv_projection(n_layer, k):
    cfg = tiny(n_layer=n_layer, kv_share=k, n_embd=32)
    shared = build_model("dec", cfg)
    followers = n_layer - math.ceil(n_layer / k)
    assert build_model("dec", tiny(n_layer=n_layer, n_embd=32)).num_params() - \
        shared.num_params() == followers * kv_params(cfg)
    assert [b.attn.c_attn.out_features == cfg.n_embd for b in shared.blocks] == \
        [i % k > 0 for i in range(n_layer)]


def repeat_kv_heads(state, cfg):
    """A GQA model's weights as an MHA model's (n_kv_head = n_head): each K/V head's rows of the
    input projections (after the query rows) copied for each of the query heads that read it."""
    hs, g, C = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head, cfg.n_embd
    out = {}
    for name, w in state.items():
        if ".c_attn." in name:
            halves = w[C:].reshape(2, cfg.n_kv_head, hs, *w.shape[1:])  # (K|V, head, hs, in)
            kv = halves.repeat_interleave(g, dim=1).reshape(2 * cfg.n_head * hs, *w.shape[1:])
            w = torch.cat([w[:C], kv])
        out[name] = w
    return out


@pytest.mark.parametrize("kw", [GQA, MQA])
@pytest.mark.parametrize("arch", ARCHS)
def test_gqa_equals_mha_with_the_kv_heads_repeated(arch, kw, sharp):
    """The reference: GQA is MHA whose K/V heads are copies, query head i reading K/V head
    i // (n_head / n_kv_head). Sharp attention in float64 (conftest.sharpen): a wrong grouping
    moves the logits by far more than 1e-9."""
    torch.manual_seed(0)
    cfg = tiny(n_layer=4, n_dec_layer=2, bias=True, **kw)
    gqa = sharp(build_model(arch, cfg)).eval()
    mha = build_model(arch, tiny(n_layer=4, n_dec_layer=2, bias=True, n_head=kw["n_head"]))
    mha.double().eval().load_state_dict(repeat_kv_heads(gqa.state_dict(), cfg))
    x = torch.randint(0, V, (2, 20))
    batch = {"x": x, "block_ids": block_ids(20, [[5, 11], [3]]), "enc_x": x[:, :8],
             "dec_x": x[:, 8:]}
    with torch.no_grad():
        assert (gqa(batch)[0] - mha(batch)[0]).abs().max() < 1e-9


def test_cla_equals_a_hand_written_reference(sharp):
    """dec with kv_share=2 over 5 layers: layers 0, 2 and 4 project K/V from their own input,
    layers 1 and 3 attend to the K/V of the layer before them."""
    torch.manual_seed(0)
    model = sharp(build_model("dec", tiny(**CLA))).eval()
    T = 16
    x = torch.randint(0, V, (2, T))
    rope, causal = model.rotary(torch.arange(T)), mask.causal_mask(T)
    h = model.wte(x)
    for i, blk in enumerate(model.blocks):
        hn = blk.ln_1(h)
        if i % 2 == 0:
            k, v = blk.attn.keys_values(hn, rope)
        h = h + blk.attn(blk.attn.queries(hn, rope), k, v, causal)
        h = h + blk.mlp(blk.ln_2(h))
    with torch.no_grad():
        assert (model({"x": x})[0] - model.lm_head(model.ln_f(h))).abs().max() < 1e-9


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_loss_is_close_to_uniform(arch):
    torch.manual_seed(0)
    cfg = tiny(vocab_size=300, n_embd=32)
    model = build_model(arch, cfg)
    w = torch.randint(0, 300, (8, 25))
    x, y = w[:, :-1], w[:, 1:]
    if arch == "encdec":
        batch = {"enc_x": x[:, :12], "dec_x": x[:, 12:], "y": y[:, 12:]}
    else:
        batch = {"x": x, "y": y, "block_ids": block_ids(24, [6, 13])}
    logits, loss = model(batch)
    assert abs(loss.item() - math.log(300)) < 0.1
    y_none = {k: v for k, v in batch.items() if k != "y"}
    assert model(y_none)[1] is None


def test_ignored_targets_carry_no_loss():
    torch.manual_seed(0)
    model = build_model("dec", tiny())
    x = torch.randint(0, V, (2, 10))
    y = torch.randint(0, V, (2, 10))
    y_half = y.clone()
    y_half[:, :5] = -1
    logits, loss = model({"x": x, "y": y_half})
    expect = F.cross_entropy(logits[:, 5:].reshape(-1, V), y[:, 5:].reshape(-1))
    assert torch.allclose(loss, expect)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("arch, kw", [(arch, kw) for arch in ARCHS for kw in ({}, GQA)]
                         + [("dec", CLA)])
def test_flex_block_masks_give_the_same_logits(arch, kw):
    """FlexAttention (for CUDA) runs eagerly on CPU without grad: same function as the dense masks."""
    torch.manual_seed(0)
    dense = build_model(arch, tiny(**kw)).eval()
    flex = build_model(arch, tiny(flex=True, **kw)).eval()
    flex.load_state_dict(dense.state_dict())
    x = torch.randint(0, V, (2, 16))
    batch = {"x": x, "block_ids": block_ids(16, [[4, 9], [2]]),
             "enc_x": x[:, :6], "enc_mask": torch.tensor([[True] * 6, [True] * 3 + [False] * 3]),
             "dec_x": x[:, 6:]}
    with torch.no_grad():
        assert (dense(batch)[0] - flex(batch)[0]).abs().max() < 1e-5


def test_too_long_row_is_refused():
    model = build_model("dec", tiny(block_size=8))
    with pytest.raises(IndexError):  # config.py refuses such rows before they are built
        model({"x": torch.zeros(1, 9, dtype=torch.long)})


def test_the_fast_rmsnorm_is_torchs():
    """model.RMSNorm's CPU paths (for training, a hand-written backward) give nn.RMSNorm's
    values and gradients, of the input and of the weight."""
    torch.manual_seed(0)
    fast, plain = M.RMSNorm(16).double(), torch.nn.RMSNorm(16).double()
    with torch.no_grad():
        fast.weight.normal_()
        plain.weight.copy_(fast.weight)
    x = torch.randn(3, 5, 16, dtype=torch.double) * 3
    grad = torch.randn(3, 5, 16, dtype=torch.double)
    results = []
    for norm in (fast, plain):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, norm.weight.grad))
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-12
    with torch.no_grad():  # inference takes the same math without the autograd function
        assert (fast(x) - plain(x)).abs().max() < 1e-12
    assert torch.autograd.gradcheck(lambda x, w: M.RMSNormFunction.apply(x, w, 1e-6),
                                    (x[:1, :2].requires_grad_(), fast.weight.detach().clone()
                                     .requires_grad_()))
