"""Execute every notebook in notebooks/ so none can rot, and check that each shows at least one picture."""

from __future__ import annotations

import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# The notebooks find their files through the installed package (sample_video_path, demo_model_path), never through
# the working directory. Every notebook runs from the repository root; one that reads a video also runs from
# notebooks/ (where Jupyter starts its kernel) to guard that rule: running every notebook from both would double the test's time.
FROM_NOTEBOOKS_DIR = "02_training_pairs.ipynb"
RUNS = [(path, "root") for path in NOTEBOOKS] + [
    (path, "notebooks") for path in NOTEBOOKS if path.name == FROM_NOTEBOOKS_DIR
]


class _CurrentInterpreterKernels(KernelSpecManager):
    """Resolve the "python3" kernel to this interpreter, whatever kernelspecs are installed elsewhere."""

    def get_kernel_spec(self, kernel_name):
        spec = super().get_kernel_spec(kernel_name)
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return spec


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ must hold at least one notebook"
    assert any(path.name == FROM_NOTEBOOKS_DIR for path in NOTEBOOKS), f"{FROM_NOTEBOOKS_DIR} is gone: pick another"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_leaves_the_backend_alone(notebook):
    """`matplotlib.use("Agg")` in a notebook hides every figure from the person who runs it in Jupyter."""
    nb = nbformat.read(notebook, as_version=4)
    offenders = [cell.source for cell in nb.cells if cell.cell_type == "code" and "matplotlib.use(" in cell.source]
    assert not offenders, offenders


@pytest.mark.parametrize(("notebook", "cwd"), RUNS, ids=lambda v: v.name if isinstance(v, pathlib.Path) else v)
def test_notebook_executes_and_shows_a_picture(notebook, cwd):
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        kernel_manager_kwargs={"kernel_spec_manager": _CurrentInterpreterKernels()},
        resources={"metadata": {"path": str(ROOT if cwd == "root" else notebook.parent)}},
    )
    client.execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pictures, f"{notebook.name} shows no picture when executed (no image/png output)"
