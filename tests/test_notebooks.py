"""Execute every notebook in notebooks/ (from the repository root and from notebooks/) so none can rot."""

from __future__ import annotations

import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


class _CurrentInterpreterKernels(KernelSpecManager):
    """Resolve the "python3" kernel to this interpreter, whatever kernelspecs are installed elsewhere."""

    def get_kernel_spec(self, kernel_name):
        spec = super().get_kernel_spec(kernel_name)
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return spec


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ must hold at least one notebook"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.parametrize("cwd", ["root", "notebooks"])
def test_notebook_executes(notebook, cwd):
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        kernel_manager_kwargs={"kernel_spec_manager": _CurrentInterpreterKernels()},
        resources={"metadata": {"path": str(ROOT if cwd == "root" else notebook.parent)}},
    )
    client.execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
