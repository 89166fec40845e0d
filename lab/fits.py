"""
Power-law fits of loss against size, L(N) = E + A * N^-alpha, and what they say: the sweep's
parameter multipliers (how many times dec's parameters another arch needs for the same loss).
numpy only; lab/sweep.py reports them.
"""

import math

import numpy as np


def fit_power_law(n, loss, offset=True):
    """Fit L(N) = E + A * N^-alpha (offset) or L(N) = A * N^-alpha to points (n, loss).

    For a fixed E the law is a line in log space, log(L - E) = log A - alpha log N, so A and alpha
    come from linear least squares, and E from a bounded search over [0, min L) for the smallest
    squared loss residual. Returns {form, E, A, alpha, rms}; ValueError for fewer distinct sizes
    than parameters, or non-positive values."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    k = 3 if offset else 2
    form = "E + A*N^-alpha" if offset else "A*N^-alpha"
    if len(set(n.tolist())) < k:
        raise ValueError(f"{len(set(n.tolist()))} distinct sizes cannot fit the {k} parameters "
                         f"of L = {form}: train at least {k} sizes")
    if (n <= 0).any() or (loss <= 0).any() or not np.isfinite(loss).all():
        raise ValueError("a power law needs positive, finite sizes and losses")

    def line(E):  # (log A, alpha, squared residual) for this E
        slope, intercept = np.polyfit(np.log(n), np.log(loss - E), 1)
        pred = E + np.exp(intercept) * n ** slope
        return intercept, -slope, float(((pred - loss) ** 2).sum())

    E = 0.0
    if offset:
        top = loss.min() * (1 - 1e-9)
        grid = np.linspace(0.0, top, 401)
        best = int(np.argmin([line(e)[2] for e in grid]))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        golden = (math.sqrt(5) - 1) / 2
        for _ in range(100):  # golden-section search between the best grid point's neighbours
            a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
            lo, hi = (lo, b) if line(a)[2] <= line(b)[2] else (a, hi)
        E = (lo + hi) / 2
    log_a, alpha, sse = line(E)
    return {"form": form, "E": float(E), "A": float(math.exp(log_a)), "alpha": float(alpha),
            "rms": math.sqrt(sse / len(n)), "points": len(n)}


def choose_fit(n, loss, mode="auto"):
    """The fit the sweep reports: mode "offset" or "power" as asked; "auto" takes E + A*N^-alpha
    when there are more sizes than its 3 parameters and E lands inside (0, min L), else the pure
    power law (E cannot be pinned). Returns the fit with a "why", or {"error": ...}."""
    try:
        if mode == "power":
            return {**fit_power_law(n, loss, offset=False), "why": "asked for (--fit power)"}
        if mode == "offset":
            return {**fit_power_law(n, loss), "why": "asked for (--fit offset)"}
        if len(set(n)) > 3:
            fit = fit_power_law(n, loss)
            if 1e-3 * min(loss) < fit["E"] < min(loss) * (1 - 1e-3):
                return {**fit, "why": "E pinned inside (0, min L)"}
            why = f"E not pinned (the best E, {fit['E']:.4g}, is at a bound)"
        else:
            why = f"E not pinned: {len(set(n))} sizes for 3 parameters"
        return {**fit_power_law(n, loss, offset=False), "why": why}
    except ValueError as e:
        return {"error": str(e)}


def fitted_loss(fit, n):
    return fit["E"] + fit["A"] * np.asarray(n, dtype=float) ** -fit["alpha"]


def params_for_loss(fit, loss):
    """The N at which the fitted law reaches `loss`; None if it never does (loss <= E), or only
    beyond any float (a nearly flat law)."""
    if loss <= fit["E"]:
        return None
    try:
        return (fit["A"] / (loss - fit["E"])) ** (1 / fit["alpha"])
    except OverflowError:
        return None


def multipliers(fits, n_ranges):
    """How many times dec's non-embedding parameters each other arch needs for the same loss,
    from the fits: at the top, middle and bottom of the loss range that both fits span over their
    own sizes (n_ranges: arch -> (smallest N, largest N)); where the ranges do not overlap, at
    dec's range, marked extrapolated. None where a fit never reaches the loss."""
    if "dec" not in fits or "error" in fits["dec"]:
        return {}

    def span(arch):  # (lowest, highest) fitted loss over the arch's sizes
        return tuple(sorted(float(v) for v in fitted_loss(fits[arch], n_ranges[arch])))

    out = {}
    for arch, fit in fits.items():
        if arch == "dec" or "error" in fit:
            continue
        (d_lo, d_hi), (a_lo, a_hi) = span("dec"), span(arch)
        lo, hi = max(d_lo, a_lo), min(d_hi, a_hi)
        extrapolated = lo > hi
        if extrapolated:
            lo, hi = d_lo, d_hi
        out[arch] = []
        for loss in sorted({hi, (lo + hi) / 2, lo}, reverse=True):
            n_dec, n_arch = params_for_loss(fits["dec"], loss), params_for_loss(fit, loss)
            ratio = n_arch / n_dec if n_arch and n_dec else None
            out[arch].append({"loss": loss, "multiplier": ratio, "extrapolated": extrapolated})
    return out


def law(fit):
    if "error" in fit:
        return f"no fit ({fit['error']})"
    offset = f"{fit['E']:.3f} + " if fit["form"].startswith("E") else ""
    return f"L = {offset}{fit['A']:.3g} N^-{fit['alpha']:.3f}"
