"""The notebooks run top to bottom on CPU (executed with nbclient) and are stored without outputs."""
import pathlib

import nbformat
import pytest

TRAINED = {}  # notebook -> the run it trained, for a later notebook to reuse

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks_and_outputs_are_stripped():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_tokenizer.ipynb", "03_finetune_mcqa.ipynb",
                                           "04_training_curves.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit notebooks without outputs"
        assert "from biomedlm_jax" in "".join(c.source for c in nb.cells)  # imports the package, no copied code


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    """Each notebook top to bottom in a fresh kernel. 04 plots the curves of the run 01 just trained
    (its BIOMEDLM_RUN input) instead of pretraining the same tiny model again; run alone, it trains its own."""
    from nbclient import NotebookClient

    monkeypatch.setenv("BIOMEDLM_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user's laptop
    if path.stem == "04_training_curves" and "01_quickstart" in TRAINED:
        monkeypatch.setenv("BIOMEDLM_RUN", TRAINED["01_quickstart"])
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.stem == "01_quickstart" and (tmp_path / "tiny" / "metrics.jsonl").exists():
        TRAINED[path.stem] = str(tmp_path / "tiny")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot was produced"
