"""Masks equal their definitions in DESIGN.md, written here the slow way."""

import random

import pytest
import torch

import mask

from mask import bdd_mask, block_ids, causal_mask, encoder_masks, render


def brute_block_ids(T, boundaries):
    ids, b = [], 0
    for t in range(T):
        if b < len(boundaries) and t == boundaries[b]:
            b += 1
        ids.append(b)
    return ids


def brute_bdd_decoder(ids):
    """DESIGN.md section 2: keys [encoder | decoder]; encoder key k allowed iff b(k) < b(q),
    decoder key k allowed iff b(k) == b(q) and k <= q."""
    T = len(ids)
    return [[ids[k] < ids[q] for k in range(T)] + [ids[k] == ids[q] and k <= q for k in range(T)]
            for q in range(T)]


def random_layout(rng, T):
    n = rng.randint(0, min(7, T - 1))
    return sorted(rng.sample(range(1, T), n))


def test_bdd_mask_matches_brute_force_on_random_layouts():
    rng = random.Random(0)
    for _ in range(50):
        T = rng.randint(1, 24)
        bounds = random_layout(rng, T)
        ids = block_ids(T, bounds)
        assert ids.tolist() == brute_block_ids(T, bounds)
        dec = bdd_mask(ids)
        assert causal_mask(T).tolist() == [[k <= q for k in range(T)] for q in range(T)]
        assert dec.shape == (T, 2 * T)
        assert dec.tolist() == brute_bdd_decoder(ids.tolist())
        assert bool(dec.any(1).all()), "a decoder row attends to nothing"
        assert bool(dec[:, T:].diagonal().all()), "every position must see itself"


def test_per_row_boundaries_give_per_row_masks():
    rng = random.Random(1)
    T = 16
    layouts = [random_layout(rng, T) for _ in range(5)]
    ids = block_ids(T, layouts)
    assert ids.shape == (5, T)
    dec = bdd_mask(ids)
    assert dec.shape == (5, T, 2 * T)
    for r, bounds in enumerate(layouts):
        assert dec[r].tolist() == brute_bdd_decoder(brute_block_ids(T, bounds))
    assert torch.equal(block_ids(T, torch.tensor([[3, 9], [4, 5]])), block_ids(T, [[3, 9], [4, 5]]))


def test_first_block_sees_no_encoder_and_nothing_sees_the_future():
    ids = block_ids(12, [4, 7])
    dec = bdd_mask(ids)
    assert not dec[:4, :12].any()  # block 0: no earlier block
    q, k = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert not (dec[:, :12] & (k >= q)).any()  # encoder keys strictly in the past
    assert not (dec[:, 12:] & (k > q)).any()  # decoder keys causal


def test_encoder_decoder_masks_respect_padding():
    valid = torch.tensor([[True, True, True], [True, False, False]])
    enc, cross = encoder_masks(valid, Td=4)
    assert enc.shape == (2, 3, 3) and cross.shape == (2, 4, 3)
    assert enc[0].all() and cross[0].all()
    assert enc[1].tolist() == [[True, False, False]] * 3
    with pytest.raises(AssertionError):  # a row with no source token would have no key
        encoder_masks(torch.tensor([[False, False]]), Td=2)


@pytest.mark.parametrize("bounds", [[0], [3, 8], [5, 2], [4, 4], [2.5], [[2], [6, 3]]])
def test_bad_boundaries_are_refused(bounds):
    """Block starts must be ints in (0, T), strictly increasing (the CLI says so in words)."""
    with pytest.raises(AssertionError):
        block_ids(8, bounds)


def test_bad_block_ids_are_refused():
    for bad in (lambda: block_ids(8, torch.tensor([2.0, 3.0])),
                lambda: bdd_mask(torch.tensor([0, 1, 0])),
                lambda: bdd_mask(torch.tensor([0.0, 1.0]))):
        with pytest.raises(AssertionError):
            bad()


def test_render_draws_halves():
    dec = bdd_mask(block_ids(4, [2]))
    assert render(dec, split=4) == "\n".join([
        "....|#...",
        "....|##..",
        "##..|..#.",
        "##..|..##",
    ])


def test_plot_draws_a_labelled_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mask import plot
    dec = bdd_mask(block_ids(8, [3, 5]))
    ax = plot(dec, title="bdd decoder", boundaries=[3, 5], split=8)
    assert ax.get_title() == "bdd decoder"
    assert ax.get_xlabel() == "key position"
    # a line just before each block start: across the queries, and in both key halves
    assert grid_lines(ax) == {"tab:red": ([2.5, 4.5], [2.5, 4.5, 10.5, 12.5]),
                              "tab:blue": ([], [7.5])}  # the split between the halves
    one_half = plot(dec[:, 8:], boundaries=[3, 5])
    assert grid_lines(one_half) == {"tab:red": ([2.5, 4.5], [2.5, 4.5])}
    plt.close("all")


def grid_lines(ax):
    """{colour: (y of the horizontal lines, x of the vertical lines)} drawn on ax, each sorted."""
    lines = {}
    for line in ax.get_lines():
        (x0, x1), (y0, y1) = line.get_xdata(), line.get_ydata()
        rows, cols = lines.setdefault(line.get_color(), ([], []))
        if y0 == y1:
            rows.append(y0)
        elif x0 == x1:
            cols.append(x0)
    return {colour: (sorted(rows), sorted(cols)) for colour, (rows, cols) in lines.items()}


# -----------------------------------------------------------------------------
# python mask.py


@pytest.mark.parametrize("argv, message", [
    (["--T", "100000"], "--T 100000: draw rows of 1 to 256 tokens"),
    (["--T", "0"], "--T 0: draw rows of 1 to 256 tokens"),
    (["--boundaries", "a,b"], "--boundaries 'a,b': entry 0 ('a') is not an integer"),
    (["--boundaries", ",,,"], "--boundaries ',,,': entry 0 ('') is not an integer"),
    (["--boundaries", "5,,8"], "--boundaries '5,,8': entry 1 ('') is not an integer"),
    (["--boundaries", "0"], "--boundaries '0': entry 0 ('0') is not in (0, 24)"),
    (["--boundaries", "5,3"], "--boundaries '5,3': entry 1 ('3') does not follow 5"),
    (["--boundaries", "2.5"], "--boundaries '2.5': entry 0 ('2.5') is not an integer"),
    (["--png", "/nonexistent/dir/x.png"], "--png /nonexistent/dir/x.png: cannot write "
     "/nonexistent/dir/x.png (No such file or directory); nothing was written"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    """Exit 2 for misuse, 3 for a file that cannot be written."""
    with pytest.raises(SystemExit) as e:
        mask.main(argv)
    assert e.value.code == (3 if "--png" in argv else 2)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def test_cli_empty_boundaries_draw_one_block_and_say_so(capsys):
    mask.main(["--T", "3", "--boundaries", ""])
    assert capsys.readouterr().out.splitlines() == [
        "no boundaries: one block, so the decoder sees only its own stream, causally",
        "...|#..", "...|##.", "...|###"]


def test_cli_writes_the_png_whole(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mask.main(["--T", "6", "--boundaries", "2,4", "--png", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
