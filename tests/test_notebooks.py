"""The notebooks run top to bottom (CPU, offline) and show what they say they show.

Each notebook is executed with nbclient in a fresh python3 kernel whose working directory is the
repository root; the results are read off the executed cells: the parseable lines the notebooks
print, and the figures (image/png outputs). The committed notebooks carry no outputs."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("01_masks.ipynb", "02_kv_cache.ipynb")


def read(name):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


@pytest.fixture(scope="module")
def executed():
    """Each notebook, executed once for this module (in memory: nothing is written to the repo)."""
    done = {}

    def run(name):
        if name not in done:
            nb = read(name)
            NotebookClient(nb, timeout=120, kernel_name="python3",
                           resources={"metadata": {"path": ROOT}}).execute()
            done[name] = nb
        return done[name]
    return run


def printed(nb):
    """Everything the notebook's cells printed to stdout, in order."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def figures(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def line(text, tag):
    """The key=value pairs of the line that starts with `tag`, as floats."""
    match = re.search(rf"^{tag} (.*)$", text, re.M)
    assert match, f"the notebook printed no {tag} line"
    return {k: float(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    """Notebooks are committed clean: small diffs; running them is what the tests below do."""
    nb = read(name)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "jupyter lab notebooks/" in nb.cells[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name} has stored outputs; clear them before committing"


def test_masks_notebook(executed):
    nb = executed("01_masks.ipynb")
    text = printed(nb)
    assert figures(nb) >= 7  # causal, encdec x3 (one figure), bdd row, encoder, decoder, leak, loss
    leak = line(text, "LEAK_CHECK")
    assert leak["correct_before"] < 1e-6          # the real mask: earlier logits do not move
    assert leak["correct_after"] > 1e-3           # ...while the changed position's do
    assert leak["wrong_before"] > 1e-4            # the deliberately wrong mask leaks
    assert line(text, "LEAK_SWEEP")["worst_before"] < 1e-6
    sup = line(text, "SUPERVISION")
    assert sup["dec"] == sup["bdd"] == 1.0
    assert 0.4 < sup["prefix-LM"] < 0.6 and 0.12 < sup["corruption"] < 0.22


def test_kv_cache_notebook(executed):
    nb = executed("02_kv_cache.ipynb")
    assert figures(nb) >= 4  # layers run, K/V held, bytes vs length, multi-turn
    results = json.loads(re.search(r"^RESULTS (.*)$", printed(nb), re.M).group(1))
    assert results["kv_bytes"] == results["kv_formula"]  # measured == DESIGN.md formula
    for d, b in zip(results["kv_bytes"]["dec"], results["kv_bytes"]["bdd"]):
        assert b * 3 == d                                 # n_dec / n_layer = 2/6
    held = results["stored_positions"]
    assert held["bdd"] == held["encdec"] and 3 * held["bdd"] == held["dec"]
    enc = results["encoded"]
    assert enc["bdd"][0] == enc["encdec"][0]              # turn 1: the prompt minus its last token
    assert all(b < e for b, e in zip(enc["bdd"][1:], enc["encdec"][1:]))  # no re-encoding
    assert enc["encdec"] == sorted(enc["encdec"])         # encdec re-reads the growing history
