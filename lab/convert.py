"""
From a trained dec to a model with a smaller decode-time cache (DESIGN.md section 4,
"Conversions"): the weights of a dec checkpoint rearranged into another variant of the same
shape, as pure functions on state dicts. `train.py --arch bdd --init_from out/dec` calls them
through config.load_source, and the run that follows is the uptraining.

- dec -> dec:kv<N> (GQA; MQA at N = 1): each layer's K/V heads mean-pooled in groups of
  n_kv_head / N consecutive heads, the heads each group's query heads read (Ainslie et al.
  2023, arXiv 2305.13245). Exact when a group's heads are equal.
- dec -> dec:cla<K> (cross-layer attention): each group of K consecutive layers keeps its first
  layer's K/V projection; the others keep their query rows and read that layer's K/V (their own
  K/V rows are dropped). Exact when a group's layers project equal K/V.
- dec -> bdd: the encoder is the dec's first n_enc layers, so its states are the dec's states at
  that depth (exactly); the decoder layers are copies of the dec's top n_dec layers, its bottom
  ones, or fresh (--decoder_init top|bottom|fresh); embeddings, head and ln_f are shared. The new
  ln_enc starts as the dec's layer n_enc's ln_1: the norm the parent trained for the states the
  encoder now ends with, so that with `top` the first decoder layer projects the earlier blocks'
  keys and values exactly as the parent's layer n_enc did. No init makes bdd the same function:
  its decoder stream starts from the embeddings and reads the encoder only in earlier blocks.
  GQA pooling composes with every target (bdd:kv1, dec:kv1:cla3).

A source that shares K/V already (dec:kv2, dec:cla2) converts into fewer K/V heads (a divisor)
or larger groups (a multiple); bdd's layers need K/V of their own, so it takes a dec without CLA.
problems() is the table of what cannot convert, checked at the config boundary; convert() trusts
it. It imports nothing of the project: shapes are ModelConfig dicts, as checkpoints keep them.
"""

import torch

DECODER_INITS = ("top", "bottom", "fresh")
# What a conversion keeps: the fields of a model's shape that the target must share with its
# parent (the K/V fields and bdd's split are what a conversion changes).
KEPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")


def variant(arch, shape):
    """A model's variant name in the lab's spelling: dec, dec:kv2, dec:kv1:cla3, bdd:kv1."""
    options = [f"kv{shape['n_kv_head']}"] if shape["n_kv_head"] != shape["n_head"] else []
    options += [f"cla{shape['kv_share']}"] if shape.get("kv_share", 1) > 1 else []
    return ":".join([arch, *options])


def converts(source_arch, source, target_arch, target):
    """True when loading the source's weights into the target is a conversion: another arch,
    fewer K/V heads or another K/V sharing (the rest of the shape is a fine-tune's check)."""
    return variant(source_arch, source) != variant(target_arch, target)


def problems(source_arch, source, target_arch, target, where):
    """What keeps the source from converting into the target, as (bad, message) rows for
    cli.refuse: the first true one is the error. where: the source, for the messages."""
    s_kv, t_kv = source["n_kv_head"], target["n_kv_head"]
    s_share, t_share = source.get("kv_share", 1), target.get("kv_share", 1)
    divisors = ", ".join(str(n) for n in range(1, s_kv + 1) if s_kv % n == 0)
    same = f"--arch {source_arch}" if source_arch != target_arch else f"--n_kv_head {s_kv}"
    return [
        (source_arch != "dec", f"{where} holds a {variant(source_arch, source)} model, not "
                               f"{variant(target_arch, target)}; give {same} (a fine-tune keeps "
                               f"its source's model; conversions start from a dec run)"),
        (target_arch not in ("dec", "bdd"), f"{where}: no conversion into {target_arch} is "
                                            f"defined (its decoder has cross-attention the dec "
                                            f"lacks); convert into bdd, dec:kv<N> or dec:cla<K>"),
        (s_kv % t_kv != 0, f"{where} has {s_kv} K/V heads per layer: a conversion mean-pools "
                           f"them into fewer, so --n_kv_head must divide {s_kv} ({divisors})"),
        (target_arch == "bdd" and s_share > 1, f"{where} shares K/V across {s_share} layers "
                                               f"(cla{s_share}), but every bdd layer needs K/V of "
                                               f"its own; convert from a dec without CLA"),
        (target_arch == "dec" and t_share % s_share != 0,
         f"{where} shares K/V in groups of {s_share} layers; a conversion can only merge whole "
         f"groups: give --kv_share a multiple of {s_share}"),
    ]


def convert(state, source, target_arch, target, fresh, decoder_init="top"):
    """(state dict of the target, a record of what was done) from a dec's state dict and shape
    source, the target's arch and shape, and fresh: a freshly initialized target's state dict
    (the shapes to fill, and the weights of a fresh decoder). problems() must hold none."""
    blocks = {i: layer_state(state, f"blocks.{i}") for i in range(source["n_layer"])}
    shared = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    s_kv, t_kv = source["n_kv_head"], target["n_kv_head"]
    steps = [f"K/V heads: {s_kv} mean-pooled into {t_kv} per layer, in groups of "
             f"{s_kv // t_kv} (Ainslie et al. 2023)"] if s_kv != t_kv else []
    if target_arch == "bdd":
        layers, more = bdd_layers(blocks, target, fresh, decoder_init)
    else:
        layers, more = cla_layers(blocks, source, target)
    out = dict(shared)
    for prefix, (layer, keep_kv) in layers.items():
        for name, t in layer.items():
            if name.startswith("attn.c_attn."):
                t = pool_kv(t, source, target) if keep_kv else t[:target["n_embd"]]
            out[f"{prefix}.{name}"] = t
    out.update(more.get("tensors", {}))
    check_shapes(out, fresh)
    record = {"source": variant("dec", source), "target": variant(target_arch, target),
              "steps": steps + more["steps"] + ["embeddings, LM head and ln_f: copied"]}
    if target_arch == "bdd":
        record["decoder_init"] = decoder_init
    return out, record


def layer_state(state, prefix):
    """{name inside the layer: tensor} of the layer at prefix ("blocks.3")."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def bdd_layers(blocks, target, fresh, decoder_init):
    """bdd's layers copied from the dec {prefix: (the source layer's tensors, keeps K/V)}, and
    {"steps": what was done, "tensors": ln_enc's weight and a fresh decoder's}. Every bdd layer
    projects K/V."""
    n_enc, n_dec = target["n_layer"] - target["n_dec_layer"], target["n_dec_layer"]
    layers = {f"encoder.{i}": (blocks[i], True) for i in range(n_enc)}
    tensors = {"ln_enc.weight": blocks[n_enc]["ln_1.weight"].clone()}
    if decoder_init == "fresh":  # the target's own init, as a run from scratch would start
        tensors.update({k: v for k, v in fresh.items() if k.startswith("decoder.")})
        copied = "freshly initialized (GPT-2 init, the run's seed)"
    else:
        first = n_enc if decoder_init == "top" else 0
        layers.update({f"decoder.{j}": (blocks[first + j], True) for j in range(n_dec)})
        copied = f"dec {numbered('layer', first, n_dec)}"
    steps = [f"encoder {numbered('layer', 0, n_enc)}: dec {numbered('layer', 0, n_enc)}",
             f"decoder {numbered('layer', 0, n_dec)}: {copied} (--decoder_init {decoder_init})",
             f"ln_enc: dec layer {n_enc}'s ln_1, the parent's norm of the states at that depth"]
    return layers, {"steps": steps, "tensors": tensors}


def numbered(what, first, n):
    """"layer 2" or "layers 0-3": n of them from first on."""
    return f"{what} {first}" if n == 1 else f"{what}s {first}-{first + n - 1}"


def cla_layers(blocks, source, target):
    """dec's layers {prefix: (tensors, keeps K/V)}: the first layer of each group of kv_share
    keeps its K/V rows, the others only their query rows; and {"steps": what was done}."""
    s_share, t_share = source.get("kv_share", 1), target.get("kv_share", 1)
    layers = {f"blocks.{i}": (blocks[i], i % t_share == 0) for i in blocks}
    steps = [] if s_share == t_share else [
        f"cross-layer K/V: groups of {t_share} layers read their first layer's K/V; the K/V "
        f"rows of layers {', '.join(str(i) for i in blocks if i % t_share and not i % s_share)} "
        f"dropped"]
    return layers, {"steps": steps}


def pool_kv(rows, source, target):
    """c_attn's weight or bias rows [queries | keys | values] with the K/V heads mean-pooled
    from the source's n_kv_head into the target's: target head j is the mean of source heads
    j*g .. j*g+g-1 (g = their ratio), the heads that head j's query heads read (model.attention
    gives query head i K/V head i // (n_head / n_kv_head)). RoPE turns every head alike, so
    pooling before it is pooling after it."""
    hs = source["n_embd"] // source["n_head"]
    s_kv, t_kv = source["n_kv_head"], target["n_kv_head"]
    if s_kv == t_kv:
        return rows
    q, k, v = rows.split([source["n_embd"], s_kv * hs, s_kv * hs])
    pool = lambda t: t.unflatten(0, (t_kv, s_kv // t_kv, hs)).mean(1).flatten(0, 1)  # noqa: E731
    return torch.cat([q, pool(k), pool(v)])


def check_shapes(state, fresh):
    """The converted state dict must fill exactly the target's parameters: a conversion rule
    that leaves one out or shapes it wrong is a bug here, not a user's error."""
    assert state.keys() == fresh.keys(), sorted(state.keys() ^ fresh.keys())
    for k, v in state.items():
        assert v.shape == fresh[k].shape, (k, tuple(v.shape), tuple(fresh[k].shape))
