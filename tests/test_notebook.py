"""docs/cross_attention.ipynb: it runs from top to bottom on the small committed model, and it is
committed without outputs."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (nbclient depends on it)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "cross_attention.ipynb"
SMALL_MODEL = REPO / "tests" / "assets" / "small-shapes"


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_the_notebook_runs_on_the_small_model_and_checks_itself(monkeypatch):
    # The kernel inherits this environment: the small model, and one thread on a shared CPU.
    monkeypatch.setenv("TUTORIAL_MODEL", str(SMALL_MODEL))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run from docs/, as Jupyter does when the notebook is opened there; an error in any cell
    # (its own asserts included) raises CellExecutionError.
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.text for output in outputs if output.output_type == "stream" and output.name == "stdout")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    # small-shapes: 16 px images, 16 tokens of width 64, a 16 px layer of 32 channels in 4 heads
    for line in [
        "embeddings (B, T, D): (1, 16, 64)",
        "we look at down.0.attn.0",
        "Q (B, heads, H*W, d): (2, 4, 256, 8)",
        "K (B, heads, T, d): (2, 4, 16, 8)",
        "V (B, heads, T, d): (2, 4, 16, 8)",
        "probabilities (B, heads, H*W, T): (2, 4, 256, 16)",
        "sum of the probabilities: 1.0000",
        "hand-computed probabilities match the layer's: True",
        "P V through to_out matches the layer's output: True",
        "same image as the run above: True",
        "blue <- red",
    ]:
        assert line in printed
    assert len(images) == 4  # the layer's maps, the pipeline's maps, the weights, the swap
