"""
The attention masks of nanoBDD's models (serve/ pads them), and the block ids they are built from.

A mask is a boolean tensor, True where a query may attend to a key (SDPA's convention). Each mask
is written once, as a rule on query and key indices, which gives a dense tensor (for SDPA, tests
and plots) or a FlexAttention BlockMask (on a GPU, where skipping the masked tiles pays):

- causal: key <= query, with `past` cached keys in front when a KV cache takes several tokens;
- encoder (bidirectional) and cross: every real (non-padding) key of the source;
- bdd decoder: one T x 2T mask over the keys [encoder | decoder] (DESIGN.md section 2):
    left half,  key k < T:   allowed iff block(k) <  block(q)   (strictly earlier blocks)
    right half, key T + k:   allowed iff block(k) == block(q) and k <= q   (causal in the block)
  Every row allows its own diagonal, so no row is empty. BlockLayout keeps the same mask as its
  blocks, each a causal mask over [encoder states before the block | the block]: model.py's
  fast path skips the masked half instead of computing it.

render() draws a mask as text, plot() as a matplotlib picture; `python mask.py` shows one.
"""

import torch

import cli
import files

# -----------------------------------------------------------------------------
# block ids


def block_ids(T, boundaries):
    """Block index of every position of a row of T tokens.

    boundaries: the start positions of blocks 1, 2, ... (block 0 starts at 0), each in (0, T),
    strictly increasing. A flat list gives ids of shape (T,); a list of lists (one per row, any
    lengths) or a 2-D tensor gives (B, T). Position t gets the number of boundaries <= t.
    """
    assert isinstance(T, int) and T >= 1, T
    if isinstance(boundaries, torch.Tensor):
        assert not boundaries.is_floating_point() and boundaries.dtype != torch.bool
        rows = boundaries.tolist() if boundaries.dim() == 2 else [boundaries.tolist()]
        batched = boundaries.dim() == 2
    else:
        boundaries = list(boundaries)
        batched = len(boundaries) > 0 and all(isinstance(r, (list, tuple)) for r in boundaries)
        rows = [list(r) for r in boundaries] if batched else [boundaries]
    positions = torch.arange(T)
    ids = []
    for row in rows:
        assert all(type(b) is int and 0 < b < T for b in row) and row == sorted(set(row)), row
        starts = torch.tensor(row, dtype=torch.long)
        ids.append((positions[:, None] >= starts[None, :]).sum(1))
    ids = torch.stack(ids)  # (B, T)
    return ids if batched else ids[0]


def check_block_ids(ids):  # integers, (T,) or (B, T), non-decreasing along the row
    assert not ids.is_floating_point() and ids.dtype != torch.bool and ids.dim() in (1, 2), ids
    if not torch.compiler.is_compiling():  # a data-dependent check would break the graph
        assert ids.shape[-1] < 2 or bool((ids[..., 1:] >= ids[..., :-1]).all()), ids


# -----------------------------------------------------------------------------
# rules: (batch, query, key) index tensors -> allowed, broadcasting like ordinary tensor ops


def causal_rule(past=0):
    """Query q (at row position past + q) sees keys 0..past + q: `past` cached keys come first."""
    return lambda b, q, k: k <= q + past


def key_padding_rule(valid):
    """Attend to every real key of the source: valid (B, Tk) bool."""
    return lambda b, q, k: valid[b, k]


def bdd_decoder_rule(ids):
    """The doubly-causal block mask over [encoder | decoder] keys; ids (B, T)."""
    T = ids.shape[-1]

    def rule(b, q, k):
        from_encoder = k < T
        pos = torch.where(from_encoder, k, k - T)  # the key's position in the row
        bq, bk = ids[b, q], ids[b, pos]
        return torch.where(from_encoder, bk < bq, (bk == bq) & (pos <= q))
    return rule


def materialize(rule, B, Tq, Tk, device=None):
    """Dense (B, Tq, Tk) boolean mask from a rule."""
    b = torch.arange(B, device=device)[:, None, None]
    q = torch.arange(Tq, device=device)[None, :, None]
    k = torch.arange(Tk, device=device)[None, None, :]
    return rule(b, q, k).expand(B, Tq, Tk)


def _build(rule, B, Tq, Tk, device, flex, squeeze):
    """The rule as a dense mask, or as a FlexAttention BlockMask (a squeezed mask is one row's,
    shared by the batch: B=None broadcasts)."""
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask
        return create_block_mask(lambda b, h, q, k: rule(b, q, k), None if squeeze else B, None,
                                 Tq, Tk, device=device)
    m = materialize(rule, B, Tq, Tk, device)
    return m[0] if squeeze else m


# -----------------------------------------------------------------------------
# the masks the models use


def causal_mask(T, device=None, flex=False, past=0):
    """(T, past + T): each of T new positions sees itself and everything before it, including
    `past` positions already in a KV cache (past=0 is the plain (T, T) training mask)."""
    return _build(causal_rule(past), 1, T, past + T, device, flex, squeeze=True)


def encoder_masks(valid, Td, flex=False):
    """Encoder-decoder masks for a right-padded source, valid (B, Te) bool (True: a real
    token): (encoder (B, Te, Te), cross (B, Td, Te)), each key a real token of the source."""
    assert valid.dtype == torch.bool and valid.dim() == 2, valid
    # every row needs a real source token (an all-padding row would have no key at all)
    assert not valid.shape[1] or torch.compiler.is_compiling() or bool(valid.any(1).all())
    B, Te = valid.shape
    rule = key_padding_rule(valid)
    return (_build(rule, B, Te, Te, valid.device, flex, squeeze=False),
            _build(rule, B, Td, Te, valid.device, flex, squeeze=False))


class BlockLayout:
    """The doubly-causal mask of G block layouts, ids (G, T) (or one, (T,)), each shared by an
    equal group of consecutive rows, kept as blocks: block (s, e) sees the keys
    [encoder[:s] | stream[s:e]] under a causal mask with s keys in front, the mask of a KV-cached
    prefill. memory_lens: where each layout's last block starts, all of the encoder it reads."""

    def __init__(self, ids):
        check_block_ids(ids)
        self.layouts = [self.blocks(row) for row in ids.view(-1, ids.shape[-1])]
        self.memory_lens = [spans[-1][0] for spans, _ in self.layouts]

    def blocks(self, ids):
        """([(s, e)] of every block of one layout's ids (T,), and the mask of each)."""
        starts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).view(-1) + 1).tolist()
        spans = list(zip(starts, starts[1:] + [ids.shape[0]]))
        # the first block sees no memory: SDPA's causal kernel needs no mask tensor for it
        return spans, ["causal" if s == 0 else causal_mask(e - s, ids.device, past=s)
                       for s, e in spans]


def bdd_mask(ids, flex=False):
    """The bdd decoder's doubly-causal mask from block ids (T,) or (B, T): (T, 2T) or
    (B, T, 2T), over the keys [encoder states | decoder stream]. (Its encoder is causal.)"""
    check_block_ids(ids)
    batched = ids.dim() == 2
    ids2 = ids if batched else ids[None]
    B, T = ids2.shape
    return _build(bdd_decoder_rule(ids2), B, T, 2 * T, ids.device, flex, squeeze=not batched)


# -----------------------------------------------------------------------------
# showing a mask


def render(mask, split=None, on="#", off="."):
    """A (Tq, Tk) mask as text, a line per query; `split`: a '|' before that key column."""
    assert mask.dim() == 2, f"render takes one (Tq, Tk) mask, not {mask.shape}"
    lines = []
    for row in mask.tolist():
        cells = [on if a else off for a in row]
        if split is not None:
            cells.insert(split, "|")
        lines.append("".join(cells))
    return "\n".join(lines)


def plot(mask, ax=None, title=None, boundaries=(), split=None, xlabel="key position",
         ylabel="query position"):
    """Draw a (Tq, Tk) mask with matplotlib: allowed cells dark. `boundaries` (block starts) are
    drawn as grid lines on both axes (and on both halves when `split` is given); `split` draws a
    vertical line between the encoder and decoder key halves and labels them."""
    import matplotlib.pyplot as plt
    assert mask.dim() == 2, f"plot takes one (Tq, Tk) mask, not {mask.shape}"
    if ax is None:
        _, ax = plt.subplots(figsize=(6 if split is None else 10, 5))
    Tq, Tk = mask.shape
    ax.imshow(mask.cpu().float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, Tk - 0.5, Tq - 0.5, -0.5))
    offsets = [0] if split is None else [0, split]
    for b in boundaries:
        ax.axhline(b - 0.5, color="tab:red", lw=0.8)
        for off in offsets:
            ax.axvline(off + b - 0.5, color="tab:red", lw=0.8)
    if split is not None:  # half labels just above the axes, in data x and axes y coordinates
        ax.axvline(split - 0.5, color="tab:blue", lw=2)
        for x, label in ((split / 2, "encoder keys: strictly earlier blocks"),
                         (split + (Tk - split) / 2, "decoder keys: causal within the block")):
            ax.text(x - 0.5, 1.01, label, ha="center", va="bottom",
                    transform=ax.get_xaxis_transform())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, pad=24 if split is not None else 6)
    return ax


# -----------------------------------------------------------------------------
# command line: python mask.py [--T 24] [--boundaries 5,8,18,19] [--png docs/bdd_mask.png]

# The largest row drawn: 2T + 1 characters a text line, and the PNG's cells still a few pixels.
MAX_T = 256


def parse_boundaries(text, T):
    """"5,8,18" -> [5, 8, 18]; "" (or only spaces) -> [] (one block). ValueError for an entry
    that is not an integer in (0, T), or that does not follow the one before it: empty entries
    such as ",,," read like a typo, not like "no boundaries"."""
    bounds = []
    for i, part in enumerate(text.split(",") if text.strip() else []):
        b = int(part) if part.strip().lstrip("-").isdigit() else None
        problem = ("is not an integer" if b is None else f"is not in (0, {T})" if not 0 < b < T
                   else f"does not follow {bounds[-1]}" if bounds and b <= bounds[-1] else None)
        if problem:
            raise ValueError(f"entry {i} ({part.strip()!r}) {problem}; give increasing block "
                             f"starts like 5,8,18, or '' for one block")
        bounds.append(b)
    return bounds


def save_png(dec, bounds, T, path):
    """Draw the decoder mask to path, written whole."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5.6))
    plot(dec, ax=ax, boundaries=bounds, split=T,
         title=f"BDD decoder: doubly-causal block mask (T = {T} queries x 2T keys)",
         xlabel=f"key index: 0..{T - 1} = encoder states, {T}..{2 * T - 1} "
                f"= decoder stream, at positions 0..{T - 1}",
         ylabel="query position")
    fig.tight_layout()
    try:
        with files.written_whole(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def main(argv=None):
    p = cli.Parser(description="Show the BDD decoder's doubly-causal block mask.")
    p.add_argument("--T", type=int, default=24, help=f"row length, 1 to {MAX_T}")
    p.add_argument("--boundaries", default="5,8,18,19",
                   help="block starts, comma-separated ('' for one block)")
    p.add_argument("--png", help="also save the plot to this PNG file")
    args = p.parse_args(argv)
    with cli.guard():
        show(args)


def show(args):
    """Print the mask of --T and --boundaries (and save it with --png)."""
    cli.refuse([(not 1 <= args.T <= MAX_T, f"--T {args.T}: draw rows of 1 to {MAX_T} tokens; a "
                 f"longer row fits neither a text line (2T + 1 characters) nor the PNG's pixels")])
    try:
        bounds = parse_boundaries(args.boundaries, args.T)
    except ValueError as e:
        raise cli.BadInput(f"--boundaries {args.boundaries!r}: {e}") from None
    dec = bdd_mask(block_ids(args.T, bounds))
    if not bounds:
        print("no boundaries: one block, so the decoder sees only its own stream, causally")
    print(render(dec, split=args.T))
    if args.png:
        try:
            save_png(dec, bounds, args.T, args.png)
        except cli.CannotWrite as e:
            raise cli.CannotWrite(f"--png {args.png}: {e}; give a path in an existing, writable "
                                  f"folder") from None
        print(f"saved {args.png}")


if __name__ == "__main__":
    main()
