"""Every notebook in notebooks/ runs top to bottom without an error (outputs are not compared)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: Seconds one cell may take; each notebook is meant to run in well under a minute on 2 cores.
CELL_TIMEOUT = 180


#: The notebooks the docs promise (the language model one needs flax, in the `test` extra).
EXPECTED = {
    "01_derivation",
    "02_training",
    "03_head",
    "04_language_model",
    "05_distillation_and_rl",
}


def test_notebooks_exist():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors, errors
